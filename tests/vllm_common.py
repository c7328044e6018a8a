"""Shared by the vLLM tests (tests/test_vllm_*.py): the environment vLLM's CPU backend needs, and transformers
references built from the same repo, image and prompt.

The vLLM tests run in the environment of ``scripts/vllm_cpu_env.sh`` (``.ci/run`` builds it); elsewhere they are
skipped. They compare vLLM with ``generate()`` in one process, on one transformers version (the one vLLM allows).
"""

import os

# Before vLLM is imported: a small KV cache, no CPU pinning (the machine is shared), the engine in this process.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

SKIP_REASON = "vLLM is not installed here: build its environment with `bash scripts/vllm_cpu_env.sh DIR` (docs/serving.md)"


def import_vllm():
    return pytest.importorskip("vllm", reason=SKIP_REASON)


SHIPPED = Path(__file__).resolve().parents[1] / "llava_rc" / "checkpoints" / "llava-rc-easyvqa"
SAMPLES = Path(__file__).resolve().parents[1] / "llava_rc" / "samples"


def engine(repo, **kwargs):
    """A vLLM engine on the CPU backend, float32 (the transformers references run in float32), eager."""
    from vllm import LLM

    options = dict(
        trust_remote_code=True, dtype="float32", max_model_len=512, enforce_eager=True, seed=0,
        limit_mm_per_prompt={"image": 2}, max_num_seqs=16,
    )
    options.update(kwargs)
    return LLM(model=str(repo), **options)


def shutdown(llm) -> None:
    import gc

    from vllm.distributed import cleanup_dist_env_and_memory

    engine_core = getattr(llm.llm_engine, "engine_core", None)
    if engine_core is not None and hasattr(engine_core, "shutdown"):
        engine_core.shutdown()
    del llm
    gc.collect()
    cleanup_dist_env_and_memory()


def greedy(max_tokens: int = 6, logprobs: int = 1):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=logprobs)


class Reference:
    """``generate()`` of the transformers model of a repo, with the repo's processor (greedy)."""

    def __init__(self, repo):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        import llava_rc

        llava_rc.register_auto_classes()
        self.torch = torch
        self.model = AutoModelForImageTextToText.from_pretrained(str(repo), dtype=torch.float32).eval()
        self.processor = AutoProcessor.from_pretrained(str(repo))

    def __call__(self, prompt: str, images, compression=None, max_new_tokens: int = 6):
        """(new token ids, log-prob of each chosen token, the CompressionReport) of one prompt."""
        inputs = self.processor(images=images, text=prompt, return_tensors="pt")
        out = self.model.generate(
            **inputs, compression=compression, max_new_tokens=max_new_tokens, do_sample=False,
            return_dict_in_generate=True, output_scores=True,
        )
        new = out.sequences[0, inputs["input_ids"].shape[1] :]
        logprobs = [
            float(score[0].float().log_softmax(-1)[token]) for score, token in zip(out.scores, new.tolist())
        ]
        return new.tolist(), logprobs, out.compression


def vllm_answer(output):
    """(token ids, log-prob of each chosen token) of a vLLM RequestOutput."""
    completion = output.outputs[0]
    ids = list(completion.token_ids)
    logprobs = [step[token].logprob for step, token in zip(completion.logprobs, ids)]
    return ids, logprobs
