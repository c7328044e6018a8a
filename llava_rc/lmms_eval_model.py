"""lmms-eval model ``llava_rc``: any LLaVA / LLaVA-NeXT repo (LLaVA-RC or stock llava-hf) with per-run compression.

Registered through the ``lmms_eval.models`` entry point (``pyproject.toml``), so after ``pip install -e ".[eval]"``:

    python -m lmms_eval --model llava_rc \
        --model_args 'pretrained=REPO,compression={"method":"rc","budget":64}' \
        --tasks gqa --batch_size 2 --log_samples --output_path results/

Imported only by lmms-eval, never by the model code. One class, one job: turn lmms-eval requests into batched
``generate()`` calls (processor chat template, left padding, the task's generation kwargs, several images per
sample) and return each answer with the tokens the language model read for it (the kept image tokens plus the
text), which lmms-eval sums into the results' ``efficiency`` section (``--log_samples``). See docs/evaluation.md.
"""

import json
import time

import torch
from accelerate import Accelerator, DistributedType
from loguru import logger
from PIL import Image
from tqdm import tqdm
from transformers import AutoModelForImageTextToText, AutoProcessor

from lmms_eval import utils
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms

IMAGE_MARKER = "<image>"  # where a task's prompt places an image; images without a marker go first


def lmms_eval_manifest():
    """The entry point lmms-eval loads (``lmms_eval.models`` group): ``--model llava_rc`` is this module's class."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="llava_rc", simple_class_path=f"{__name__}.LlavaRC")


def parse_compression_arg(value) -> dict | None:
    """The ``compression=`` model arg as generate()'s per-call settings.

    None (not given) keeps the repo's configured compression; a method name (``rc``, ``none``, ...) gives
    ``{"method": name}``; a JSON object (optionally quoted) gives the full settings.
    """
    if value is None or isinstance(value, dict):
        return value
    if not isinstance(value, str):
        raise ValueError(f"compression must be a method name or a JSON object, got {value!r}")
    text = value.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1].strip()
    if not text.startswith("{"):
        if not text.isidentifier():
            raise ValueError(f"compression must be a method name (e.g. rc, none) or a JSON object, got {value!r}")
        return {"method": text}
    try:
        settings = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"compression={value!r} is not valid JSON ({error}); expected e.g. "
                         '{"method": "rc", "budget": 64}') from error
    if not isinstance(settings, dict) or "method" not in settings:
        raise ValueError(f"compression JSON must be an object with a 'method' key, got {value!r}")
    return settings


def user_message(context: str, num_images: int) -> dict:
    """One user turn in the processor's chat format: the prompt's ``<image>`` markers become image parts (any
    images beyond the markers go first, as LLaVA places them)."""
    pieces = context.split(IMAGE_MARKER)
    markers = len(pieces) - 1
    if markers > num_images:
        raise ValueError(f"the prompt has {markers} {IMAGE_MARKER} markers but the sample has {num_images} images")
    content = [{"type": "image"} for _ in range(num_images - markers)]
    for index, piece in enumerate(pieces):
        if index > 0:
            content.append({"type": "image"})
        if piece.strip():
            content.append({"type": "text", "text": piece.strip()})
    return {"role": "user", "content": content}


def truncate_at_stop(text: str, until: list[str]) -> str:
    """The answer up to the first stop string the task names."""
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text


class LlavaRC(lmms):
    """lmms-eval model for LLaVA / LLaVA-NeXT repos, with the compression set per run.

    Model args (``--model_args key=value,...``): ``pretrained`` (repo id or directory), ``revision``, ``dtype``
    (``auto``, ``float16``, ``bfloat16``, ``float32``), ``device_map``, ``attn_implementation``,
    ``trust_remote_code`` (default True: LLaVA-RC repos are remote code), ``compression`` (not given: the repo's
    configured compression; ``none``: all tokens; a method name; or JSON such as ``{"method":"rc","budget":64}``),
    ``max_new_tokens`` (used when a task does not set it). ``--batch_size N`` batches with left padding; under
    ``accelerate launch`` each process holds a full copy of the model (data parallel), as lmms-eval's own HF models do.
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        revision: str = "main",
        device: str | None = None,
        dtype: str = "auto",
        batch_size: int | str = 1,
        device_map: str | None = None,
        attn_implementation: str | None = None,
        trust_remote_code: bool = True,
        compression: str | dict | None = None,
        max_new_tokens: int = 1024,
        max_batch_size: int | None = None,
        **kwargs,
    ) -> None:
        super().__init__()
        if kwargs:
            raise ValueError(
                f"unknown llava_rc model_args {sorted(kwargs)}; expected pretrained, revision, dtype, device_map, "
                "attn_implementation, trust_remote_code, compression, max_new_tokens"
            )
        if not str(batch_size).isdigit() or int(batch_size) < 1 or max_batch_size is not None:
            raise ValueError(
                f"llava_rc needs --batch_size N with N >= 1 (no automatic batch size), got batch_size={batch_size!r}, "
                f"max_batch_size={max_batch_size!r}"
            )
        if dtype != "auto" and not isinstance(getattr(torch, str(dtype), None), torch.dtype):
            raise ValueError(f"dtype must be 'auto' or a torch dtype name such as 'bfloat16', got {dtype!r}")
        self.compression = parse_compression_arg(compression)

        accelerator = Accelerator()
        if accelerator.num_processes > 1:
            if device_map not in (None, ""):
                raise ValueError(f"data parallel runs place one model per process; drop device_map={device_map!r}")
            self._device = accelerator.device
            device_map = str(accelerator.device)
        else:
            default_device = "cuda" if torch.cuda.is_available() else "cpu"
            self._device = torch.device(device if device is not None else default_device)
        loaded_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
        load_kwargs = {"revision": revision, "trust_remote_code": trust_remote_code}
        self._model = AutoModelForImageTextToText.from_pretrained(
            pretrained,
            dtype=loaded_dtype,
            device_map=device_map or None,
            attn_implementation=attn_implementation,
            **load_kwargs,
        ).eval()
        self.processor = AutoProcessor.from_pretrained(pretrained, **load_kwargs)
        self.processor.tokenizer.padding_side = "left"  # batched generation appends after the last column
        if self.processor.chat_template is None:
            raise ValueError(f"{pretrained} has no chat template in its processor; llava_rc prompts through it")
        self._check_compression(pretrained)

        if accelerator.num_processes > 1:
            if accelerator.distributed_type not in (DistributedType.MULTI_GPU, DistributedType.FSDP):
                raise ValueError(
                    f"llava_rc runs data parallel (MULTI_GPU); accelerate is set up for {accelerator.distributed_type}"
                )
            self._model = accelerator.prepare_model(self._model, evaluation_mode=True)
            self._rank = accelerator.local_process_index
            self._world_size = accelerator.num_processes
        elif device_map:
            self._device = self._model.device  # inputs go where the first layers are
        else:
            self._model.to(self._device)
        self.accelerator = accelerator
        self.pretrained = pretrained
        self.batch_size_per_gpu = int(batch_size)
        self.default_max_new_tokens = int(max_new_tokens)

    def _check_compression(self, pretrained: str) -> None:
        """Fail before any request when the compression setting cannot apply to this repo.

        A stock repo (no ``compression_settings``) is its own baseline: ``none`` runs it, and generate() is then
        called without the ``compression`` argument it does not know.
        """
        settings = getattr(self._model, "compression_settings", None)
        if settings is not None:
            settings(self.compression)  # the repo's own validation: unknown method, key or value -> ValueError
            return
        if self.compression not in (None, {"method": "none"}):
            raise ValueError(
                f"compression={self.compression!r} needs an LLaVA-RC repo; {pretrained} "
                f"({self._model.config.model_type}) has no compression: use compression=none or convert it "
                "with llava-rc-upload"
            )
        self.compression = None

    @property
    def model(self):
        return self.accelerator.unwrap_model(self._model) if self.world_size > 1 else self._model

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self):
        return self._device

    def generation_settings(self, gen_kwargs: dict) -> tuple[dict, list[str]]:
        """generate() kwargs from a task's ``generation_kwargs`` (greedy unless temperature > 0), and its stop strings."""
        until = gen_kwargs.get("until", [])
        until = [until] if isinstance(until, str) else list(until)
        temperature = float(gen_kwargs.get("temperature", 0) or 0)
        settings = {
            "max_new_tokens": int(gen_kwargs.get("max_new_tokens", self.default_max_new_tokens)),
            "num_beams": int(gen_kwargs.get("num_beams", 1) or 1),
            "do_sample": temperature > 0,
            "pad_token_id": self.processor.tokenizer.pad_token_id,
        }
        if temperature > 0:
            settings["temperature"] = temperature
            if gen_kwargs.get("top_p") is not None:
                settings["top_p"] = float(gen_kwargs["top_p"])
        return settings, until

    def language_model_tokens(self, inputs, report, images_per_sample: list[int]) -> torch.Tensor:
        """(B,) tokens the language model read per sample: its text tokens plus its images' kept tokens.

        Without a compression report (method "none", or a stock repo) every image placeholder is read.
        """
        real = inputs["attention_mask"].bool()  # (B, L)
        image_positions = real & (inputs["input_ids"] == self.model.config.image_token_id)  # (B, L)
        text_tokens = (real & ~image_positions).sum(dim=1)  # (B,)
        if report is None:
            return text_tokens + image_positions.sum(dim=1)
        kept = report.kept_counts.to(text_tokens.device)  # (I,) in reading order over the batch
        sample_of_image = torch.repeat_interleave(
            torch.arange(len(images_per_sample), device=kept.device),
            torch.tensor(images_per_sample, device=kept.device),
        )  # (I,)
        kept_per_sample = torch.zeros_like(text_tokens).index_add_(0, sample_of_image, kept.to(text_tokens.dtype))
        return text_tokens + kept_per_sample

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        # Imported here: importing lmms_eval.models loads the entry points, this module among them.
        from lmms_eval.models.model_utils.gen_metrics import log_metrics

        tokenizer = self.processor.tokenizer
        # Longest prompts first (memory errors show at once); one batch shares one generation setting.
        collator = utils.Collator([request.args for request in requests], lambda args: (-len(args[0]), args[0]),
                                  grouping=True)
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc="llava_rc")
        results = []
        for chunk in collator.get_batched(n=self.batch_size, batch_fn=None):
            contexts, gen_kwargs, doc_to_visual, doc_ids, tasks, splits = zip(*chunk)
            visuals = [list(visual(self.task_dict[task][split][doc_id]))
                       for visual, doc_id, task, split in zip(doc_to_visual, doc_ids, tasks, splits)]
            for task, sample in zip(tasks, visuals):
                if not all(isinstance(visual, Image.Image) for visual in sample):
                    kinds = sorted({type(visual).__name__ for visual in sample})
                    raise ValueError(f"llava_rc evaluates images; task {task!r} gives {kinds}")
            prompts = [
                self.processor.apply_chat_template([user_message(context, len(sample))], add_generation_prompt=True,
                                                   tokenize=False)
                for context, sample in zip(contexts, visuals)
            ]
            images = [image.convert("RGB") for sample in visuals for image in sample]
            inputs = self.processor(images=images or None, text=prompts, padding=True, return_tensors="pt")
            inputs = inputs.to(self.device, dtype=self.model.dtype)  # casts only floating tensors (pixels)
            settings, until = self.generation_settings(gen_kwargs[0])
            if self.compression is not None:
                settings["compression"] = self.compression
            started = time.perf_counter()
            with torch.inference_mode():
                output = self.model.generate(**inputs, **settings, return_dict_in_generate=True)
            elapsed = time.perf_counter() - started
            prompt_length = inputs["input_ids"].shape[1]
            new_tokens = output.sequences[:, prompt_length:]  # (B, T)
            lm_tokens = self.language_model_tokens(inputs, getattr(output, "compression", None),
                                                   [len(sample) for sample in visuals]).tolist()
            # Generated tokens up to and including the first end-of-sequence token.
            end_ids = self.model.generation_config.eos_token_id
            end_ids = [] if end_ids is None else [end_ids] if isinstance(end_ids, int) else list(end_ids)
            finished = torch.isin(new_tokens, torch.tensor(end_ids, dtype=torch.long, device=new_tokens.device))
            first_end = torch.where(finished.any(dim=1), finished.int().argmax(dim=1) + 1, new_tokens.shape[1])
            texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            for text, read, written in zip(texts, lm_tokens, first_end.tolist()):
                counts = TokenCounts(input_tokens=int(read), output_tokens=int(written))
                results.append(GenerationResult(text=truncate_at_stop(text, until).strip(), token_counts=counts))
            images_read = sum(len(sample) for sample in visuals)
            log_metrics(
                total_elapsed_time=elapsed,
                total_gen_tokens=int(first_end.sum()),
                avg_speed=float(first_end.sum()) / elapsed if elapsed > 0 else 0.0,
                additional_metrics={
                    "total_requests": len(chunk),
                    "lm_input_tokens_per_sample": sum(lm_tokens) / len(lm_tokens),
                    "images_per_sample": images_read / len(chunk),
                },
            )
            progress.update(len(chunk))
        progress.close()
        return collator.get_original(results)

    def loglikelihood(self, requests: list[Instance]):
        raise NotImplementedError("llava_rc runs generate_until tasks (GQA, TextVQA, POPE, MME, ...), not loglikelihood")

    def generate_until_multi_round(self, requests: list[Instance]):
        raise NotImplementedError("llava_rc runs single-turn generate_until tasks, not multi-round ones")
