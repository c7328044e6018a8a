"""Convert a stock LLaVA, LLaVA-NeXT, LLaVA-OneVision, Qwen2.5-VL or Qwen3-VL checkpoint into an RC Hub repo (remote
code), verify it, save/push it.

Console script ``llava-rc-upload`` (also ``python -m llava_rc.hub_upload``)::

    llava-rc-upload --base llava-hf/llava-1.5-7b-hf --method cls_attention --set budget=64 \\
        --output-dir ./llava-1.5-7b-rc --repo-id my-org/llava-1.5-7b-rc
    llava-rc-upload --base llava-hf/llava-v1.6-mistral-7b-hf --method gprune --output-dir ./llava-v1.6-mistral-7b-rc

A ``llava`` base becomes ``LlavaRCForConditionalGeneration`` (model_type ``llava_rc``), a ``llava_next`` base
``LlavaNextRCForConditionalGeneration`` (``llava_next_rc``), a ``llava_onevision`` base
(``llava-hf/llava-onevision-qwen2-0.5b-ov-hf``, ``-7b-ov-hf``) ``LlavaOnevisionRCForConditionalGeneration``
(``llava_onevision_rc``), a ``qwen2_5_vl`` / ``qwen3_vl`` base (``Qwen/Qwen2.5-VL-7B-Instruct``,
``Qwen/Qwen3-VL-8B-Instruct``) ``Qwen2_5_VLRCForConditionalGeneration`` / ``Qwen3VLRCForConditionalGeneration``
(``qwen2_5_vl_rc`` / ``qwen3_vl_rc``); ``auto_map`` names the matching classes.

Every cheap check (arguments, compression settings, base config, output dir, credentials) runs before any weights
are loaded. The repo is written to a temporary directory next to the destination and loaded back in a fresh
interpreter where ``llava_rc`` cannot be imported; only if that succeeds is it moved into place and/or pushed.

An existing ``--output-dir`` (``--force``) is never lost: it is renamed aside, the new repo is renamed in, and only
then is the old one deleted; if the second rename fails the old one is renamed back. Both renames run with SIGINT and
SIGTERM held back, so an interrupt leaves the destination either the old repo, complete, or the new one, complete.
SIGTERM is handled like Ctrl-C: the verification process is ended and the staging and temporary folders are removed.

torch, transformers and huggingface_hub are imported inside the functions that use them, after the arguments are
parsed, so ``--help`` and argument errors answer at once.

Debug hook: ``LLAVA_RC_UPLOAD_PAUSE=STEP[:SECONDS]`` makes the tool print ``paused at STEP`` to stderr and sleep
(60 s by default) at one of PAUSE_STEPS; the tests interrupt a real conversion there. A signal ends the sleep, except
in the two steps inside the rename ("aside", "replaced"), where it is held back until both renames are done.

This is a command-line tool, not model code: no model file imports it, so it is not copied into Hub repos.
"""

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

DTYPES = ("auto", "bfloat16", "float16", "float32")
# LlavaRCConfig's default method (a test checks they agree); a literal so that --help needs no torch.
DEFAULT_METHOD = "rc"
# Method names for --help (a test checks they are the registry's).
METHOD_NAMES = ("rc", "none", "cls_attention", "prumerge", "prumerge_plus", "gprune", "trsm", "random")
PAUSE_ENVIRONMENT = "LLAVA_RC_UPLOAD_PAUSE"
# Named steps of a conversion, in order; "aside" and "replaced" lie inside the rename, where signals are held back.
PAUSE_STEPS = ("load", "write", "verify", "aside", "replaced", "push")
HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM)
UPLOAD_PATTERNS = ["*.json", "*.safetensors", "*.py", "*.md", "*.jinja", "*.model", "*.txt", "*.tiktoken"]
VERIFY_MAX_NEW_TOKENS = 8
# Used for the "compression on" check when the repo's own setting is "none".
VERIFY_COMPRESSION_ON = {"method": "cls_attention", "budget": 0.5}
TOTAL_STEPS = 5
BASE_MODEL_TYPES = ("llava", "llava_next", "llava_onevision", "qwen2_5_vl", "qwen3_vl")


def family(model_type: str) -> tuple:
    """(stock class, RC config class, RC model class) of a base's model_type; the stock class maps old key layouts.

    Looked up at call time (not a module-level table), so that the names can be replaced in tests
    (``transformers.LlavaForConditionalGeneration``).
    """
    from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration
    from transformers import LlavaOnevisionForConditionalGeneration, Qwen2_5_VLForConditionalGeneration
    from transformers import Qwen3VLForConditionalGeneration

    from . import LlavaNextRCConfig, LlavaNextRCForConditionalGeneration, LlavaRCConfig, LlavaRCForConditionalGeneration
    from . import LlavaOnevisionRCConfig, LlavaOnevisionRCForConditionalGeneration
    from . import Qwen2_5_VLRCConfig, Qwen2_5_VLRCForConditionalGeneration, Qwen3VLRCConfig
    from . import Qwen3VLRCForConditionalGeneration

    return {
        "llava": (LlavaForConditionalGeneration, LlavaRCConfig, LlavaRCForConditionalGeneration),
        "llava_next": (LlavaNextForConditionalGeneration, LlavaNextRCConfig, LlavaNextRCForConditionalGeneration),
        "llava_onevision": (
            LlavaOnevisionForConditionalGeneration, LlavaOnevisionRCConfig, LlavaOnevisionRCForConditionalGeneration
        ),
        "qwen2_5_vl": (Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLRCConfig, Qwen2_5_VLRCForConditionalGeneration),
        "qwen3_vl": (Qwen3VLForConditionalGeneration, Qwen3VLRCConfig, Qwen3VLRCForConditionalGeneration),
    }[model_type]


RC_CITATION = """@article{chen2024recoverable,
  title   = {Recoverable Compression: A Multimodal Vision Token Recovery Mechanism Guided by Text Information},
  author  = {Chen, Yi and Xu, Jian and Zhang, Xu-Yao and Liu, Wen-Zhuo and Liu, Yang-Yang and Liu, Cheng-Lin},
  journal = {arXiv preprint arXiv:2409.01179},
  year    = {2024}
}"""

# Prepended to every script run by run_without_llava_rc: the package (even when installed) cannot be imported, so
# only a repo's own copied code files can load.
BLOCK_LLAVA_RC = """import importlib.abc, sys

class BlockLlavaRC(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "llava_rc" or name.startswith("llava_rc."):
            raise ImportError(f"{name} is blocked in this process")

sys.meta_path.insert(0, BlockLlavaRC())
"""

# Runs in a fresh interpreter, from an empty folder, with llava_rc blocked: only the repo's copied code can load.
VERIFY_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    repo, reference_path = sys.argv[1], sys.argv[2]
    reference = torch.load(reference_path)
    model = AutoModelForImageTextToText.from_pretrained(repo, trust_remote_code=True, dtype=reference["dtype"]).eval()
    processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True)
    image = Image.fromarray(reference["image"].numpy())
    inputs = processor(images=image, text=reference["prompt"], return_tensors="pt")
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    settings = dict(max_new_tokens=reference["max_new_tokens"], do_sample=False)
    with torch.no_grad():
        off = model.generate(**inputs, compression={"method": "none"}, **settings)
        on_settings = model.config.compression if model.config.compression["method"] != "none" else reference["on"]
        on = model.generate(**inputs, compression=on_settings, **settings)
    print(json.dumps({
        "model_type": model.config.model_type,
        "module": type(model).__module__,
        "inputs_equal": torch.equal(inputs["input_ids"], reference["input_ids"]),
        "off_equal": torch.equal(off, reference["sequences"]),
        "on_new_tokens": on.shape[1] - inputs["input_ids"].shape[1],
    }))
    """
)


def log(step: int, message: str) -> None:
    print(f"[{step}/{TOTAL_STEPS}] {message}", file=sys.stderr, flush=True)


def debug_pause(step: str, detail: str = "") -> None:
    """The documented debug hook: sleep at ``step`` when LLAVA_RC_UPLOAD_PAUSE names it (see the module docstring)."""
    requested = os.environ.get(PAUSE_ENVIRONMENT)
    if not requested:
        return
    name, _, seconds = requested.partition(":")
    if name not in PAUSE_STEPS:
        raise SystemExit(f"{PAUSE_ENVIRONMENT}={requested!r}: expected STEP[:SECONDS] with STEP one of {PAUSE_STEPS}")
    if name == step:
        print(f"llava-rc-upload: paused at {step}{detail}", file=sys.stderr, flush=True)
        time.sleep(float(seconds or 60))


def raise_system_exit(signum: int, frame) -> None:
    """SIGTERM handler: unwind like Ctrl-C (every ``finally`` runs), exiting with the shell's 128 + signal code."""
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def signals_held():
    """Hold SIGINT and SIGTERM back for the block (main thread only); one that arrived meanwhile is raised again, to
    its own handler, when the block ends.

    Python-level handlers rather than a signal mask: a process-directed signal may reach any thread (torch starts
    some), and CPython runs the Python handler in the main thread whichever thread received it.
    """
    received = []
    previous = {number: signal.signal(number, lambda signum, frame: received.append(signum)) for number in HELD_SIGNALS}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        if received:
            signal.raise_signal(received[0])


@contextlib.contextmanager
def sigterm_like_sigint():
    """SIGTERM raises SystemExit(143) for the block (Python's default would end the process without any cleanup)."""
    previous = signal.signal(signal.SIGTERM, raise_system_exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def replace_directory(staging: Path, destination: Path) -> None:
    """Move ``staging`` to ``destination`` without ever losing the repo at ``destination``.

    An existing destination is renamed aside (next to it), ``staging`` is renamed in, then the old one is deleted; if
    the second rename fails, the old one is renamed back. The renames run with signals held back.
    """
    aside = None
    try:
        with signals_held():
            if destination.exists():
                # An empty directory made for the name; POSIX rename replaces an empty directory.
                aside = Path(tempfile.mkdtemp(prefix=f".{destination.name}.old-", dir=destination.parent))
                os.replace(destination, aside)
                debug_pause("aside")
            try:
                os.replace(staging, destination)
            except BaseException:
                if aside is not None:
                    os.replace(aside, destination)
                    aside = None
                raise
            debug_pause("replaced")
    finally:
        if aside is not None:
            with signals_held():
                shutil.rmtree(aside, ignore_errors=True)


def parse_value(text: str):
    """JSON when it parses (``64`` -> int, ``0.1`` -> float, ``true`` -> bool), else the string itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llava-rc-upload",
        description="Turn a stock LLaVA checkpoint into a LLaVA-RC repo (trust_remote_code), verify it, save/push it.",
        epilog="Example: llava-rc-upload --base llava-hf/llava-1.5-7b-hf --method cls_attention --set budget=64 "
        "--output-dir ./llava-1.5-7b-rc",
    )
    parser.add_argument(
        "--base",
        required=True,
        help="Hub repo id or local directory of a stock LLaVA, LLaVA-NeXT, LLaVA-OneVision, Qwen2.5-VL or Qwen3-VL "
        "model (llava-hf/llava-1.5-7b-hf, llava-hf/llava-v1.6-mistral-7b-hf, llava-hf/llava-onevision-qwen2-7b-ov-hf, "
        "Qwen/Qwen2.5-VL-7B-Instruct, Qwen/Qwen3-VL-8B-Instruct, ...)",
    )
    parser.add_argument(
        "--method",
        help=f"compression method written to the repo's config, one of {', '.join(METHOD_NAMES)} "
        f"(default: {DEFAULT_METHOD}, or the method of a --set method=...)",
    )
    parser.add_argument(
        "--set",
        dest="settings",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a setting of the method, repeatable; it updates the method's defaults; VALUE is parsed as JSON when "
        "possible (budget=64, budget=0.1, guidance=null); a method=... must agree with --method",
    )
    parser.add_argument(
        "--clip",
        help="repo id or directory of the CLIP model whose text tower and projections give 'clip' guidance "
        "(for LLaVA-1.5: openai/clip-vit-large-patch14-336); without it the repo has no working text guidance: "
        "rc and trsm run without it (guidance 'auto' resolves to none; the command says so)",
    )
    parser.add_argument(
        "--base-model-id",
        help="the base's Hub id for the model card's base_model (default: --base when it is a Hub id, else the "
        "_name_or_path in the base's config.json when that is a Hub id; a local path is never written)",
    )
    parser.add_argument("--output-dir", type=Path, help="write the verified repo here")
    parser.add_argument("--repo-id", help="push the verified repo to this Hub repo (ORG/NAME)")
    parser.add_argument("--private", action="store_true", help="create the Hub repo as private")
    parser.add_argument("--revision", help="branch to push to (default: the repo's default branch)")
    parser.add_argument("--commit-message", help="commit message of the push (default: names the method and base)")
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace a non-empty --output-dir (the old one is kept until the new one is in place)",
    )
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="dtype of the saved weights (default: %(default)s, the base's own)",
    )
    return parser


def parse_settings(
    parser: argparse.ArgumentParser, method: str | None, items: list[str], clip: str | None = None
) -> dict:
    """The validated compression settings: the method's defaults updated by the --set keys (the per-call
    ``compression=`` rule; a stock base has no settings of its own). A --set method=... that contradicts --method is
    an error. Text-guided methods default to "clip" guidance when --clip is given."""
    from . import parse_compression

    given = {}
    for item in items:
        key, separator, value = item.partition("=")
        if not separator or not key.strip():
            parser.error(f"--set expects KEY=VALUE, got {item!r}")
        given[key.strip()] = parse_value(value)
    if method is not None and "method" in given and given["method"] != method:
        parser.error(
            f"--set method={given['method']!r} contradicts --method {method!r}: give the method once "
            f"(--set keys update the settings of the chosen method)"
        )
    compression = {**given, "method": method or given.get("method", DEFAULT_METHOD)}
    try:
        settings = parse_compression(compression).to_dict()
    except (ValueError, TypeError) as error:
        parser.error(f"invalid compression settings {compression}: {error}")
    if clip is not None and "guidance" in settings and "guidance" not in compression:
        settings["guidance"] = "clip"
    if clip is None and settings.get("guidance") == "clip":
        parser.error("guidance=clip needs the CLIP text tower: pass --clip")
    return settings


def guidance_statement(compression: dict, clip: str | None) -> str:
    """One line saying which text guidance the written repo's method will use by default."""
    method = compression["method"]
    if "guidance" not in compression:
        return f"text guidance: none ({method!r} does not read the question)"
    guidance = compression["guidance"]
    if guidance == "clip" or (guidance == "auto" and clip is not None):
        return f"text guidance: 'clip' (the text tower and projections of --clip {clip})"
    if guidance == "auto":
        return (
            f"text guidance: none. {method!r} has guidance='auto' and this repo gets no CLIP text tower (no --clip), "
            "so it runs without text guidance and says so when used; pass --clip (for LLaVA-1.5: "
            "openai/clip-vit-large-patch14-336) for the RC paper's guidance"
        )
    if guidance == "llm":
        return (
            "text guidance: 'llm' (the LLM's input embeddings of the question), as set; measured not to aim at the "
            "question (docs/methods.md, \"Text guidance\")"
        )
    return f"text guidance: none (guidance={guidance!r}, as set)"


def check_clip_config(clip: str, base_config) -> None:
    """The CLIP model must be a CLIP whose visual projection reads the base's vision tower width."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(clip)
    except Exception as error:  # noqa: BLE001 - any failure here means the CLIP model cannot be used
        raise SystemExit(f"cannot read the config of --clip {clip!r}: {error}") from error
    if config.model_type != "clip":
        raise SystemExit(f"--clip {clip!r} has model_type {config.model_type!r}; expected a CLIP model ('clip')")
    clip_width, tower_width = config.vision_config.hidden_size, base_config.vision_config.hidden_size
    if clip_width != tower_width:
        raise SystemExit(
            f"--clip {clip!r}: its visual projection reads {clip_width}-wide vision features but the base's vision "
            f"tower is {tower_width} wide; use the CLIP model the base's vision tower came from"
        )


def check_base_config(base: str):
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(base)
    except Exception as error:  # noqa: BLE001 - any failure here means the base cannot be used
        raise SystemExit(f"cannot read the config of --base {base!r}: {error}") from error
    if config.model_type not in BASE_MODEL_TYPES:
        raise SystemExit(
            f"--base {base!r} has model_type {config.model_type!r}; expected a stock LLaVA, LLaVA-NeXT, "
            f"LLaVA-OneVision, Qwen2.5-VL or Qwen3-VL checkpoint "
            f"({' or '.join(repr(name) for name in BASE_MODEL_TYPES)})"
        )
    return config


def is_hub_id(name) -> bool:
    """Whether ``name`` has the form of a Hub repo id (NAME or ORG/NAME) and is not an absolute or relative path."""
    if not isinstance(name, str) or name.startswith((".", "~", "/")) or ".." in name or "--" in name:
        return False
    return re.fullmatch(r"[\w.-]{1,96}(/[\w.-]{1,96})?", name) is not None and not name.endswith(".")


def base_model_id(base: str, given: str | None) -> str | None:
    """The base's Hub id for the model card: ``given`` (--base-model-id), else --base itself when it is not a local
    folder, else the ``_name_or_path`` recorded in the folder's config.json when that is a Hub id, else None."""
    if given is not None:
        return given
    local = Path(base)
    if not local.is_dir():
        return base
    try:
        recorded = json.loads((local / "config.json").read_text()).get("_name_or_path")
    except (OSError, ValueError):
        return None
    return recorded if is_hub_id(recorded) else None


def base_license(base: str) -> str:
    """The license in the base model's card metadata, or "other" when it is not known."""
    from huggingface_hub import ModelCard

    try:
        local = Path(base)
        card = ModelCard.load(local / "README.md" if local.is_dir() else base)
        license_name = card.data.license
    except Exception:  # noqa: BLE001 - no card, no network, bad YAML: all mean "unknown"
        return "other"
    return license_name if isinstance(license_name, str) and license_name else "other"


def model_card(base_id: str | None, compression: dict, license_name: str, repo_name: str) -> str:
    """The repo's README: metadata (``base_model`` only when the base's Hub id is known), usage and citation."""
    method = compression["method"]
    settings = ", ".join(f"`{key}={value!r}`" for key, value in compression.items() if key != "method")
    if method == "none":
        description = "Compression is off (`method: none`): the model behaves exactly like the base model."
    else:
        description = (
            f"Each image's visual tokens are compressed with `{method}`"
            + (f" ({settings})" if settings else "")
            + " before the language model reads them."
        )
    metadata = {
        **({"base_model": base_id} if base_id is not None else {}),
        "pipeline_tag": "image-text-to-text",
        "library_name": "transformers",
        "license": license_name,
        "tags": ["llava", "llava-rc", "visual-token-compression", "custom_code"],
    }
    base_link = f"[{base_id}](https://huggingface.co/{base_id})" if base_id is not None else "a stock LLaVA model"
    yaml = "\n".join(
        f"{key}:\n" + "\n".join(f"- {item}" for item in value) if isinstance(value, list) else f"{key}: {value}"
        for key, value in metadata.items()
    )
    return f"""---
{yaml}
---

# {repo_name}

{base_link} with training-free visual-token compression (LLaVA-RC). The weights are
the base model's, unchanged; `generate()` compresses the visual tokens of every image before the language model
reads them.

## Compression

{description}

```json
{json.dumps(compression, indent=2)}
```

Override per call with `model.generate(..., compression={{"method": "none"}})`.

## Usage

```python
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

repo = "{repo_name}"
model = AutoModelForImageTextToText.from_pretrained(repo, trust_remote_code=True, dtype="auto")
processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True)

image = Image.new("RGB", (640, 480), "royalblue")  # your picture: Image.open("photo.jpg")
conversation = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "What is shown?"}}]}}]
prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)  # the base model's prompt format
inputs = processor(images=image, text=prompt, return_tensors="pt")
out = model.generate(**inputs, max_new_tokens=30)
print(processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```

## Citation

Recoverable Compression (arXiv 2409.01179):

```bibtex
{RC_CITATION}
```

Base model: {base_link}; please also cite the work in its model card.
"""


def load_and_convert(base: str, dtype, compression: dict, clip: str | None = None, model_type: str = "llava"):
    """The stock model (it maps old key layouts), and the RC subclass holding exactly its weights (plus, with
    ``clip``, CLIP's text tower and projections for "clip" guidance). model_type: the base's (BASE_MODEL_TYPES)."""
    import torch
    from transformers import CLIPModel

    stock_class, config_class, model_class = family(model_type)
    stock = stock_class.from_pretrained(base, dtype=dtype).eval()
    config_dict = {key: value for key, value in stock.config.to_dict().items() if key != "model_type"}
    state_dict = stock.state_dict()
    buffers = dict(stock.named_buffers())
    if clip is not None:
        clip_model = CLIPModel.from_pretrained(clip, dtype=dtype).eval()
        text_config = clip_model.config.text_config.to_dict()
        text_config.pop("model_type", None)
        config_dict.update(guidance_text_config=text_config, guidance_projection_dim=clip_model.config.projection_dim)
        for name, tensor in clip_model.text_model.state_dict().items():
            state_dict[f"guidance_text_model.{name}"] = tensor
        for name, buffer in clip_model.text_model.named_buffers():
            buffers[f"guidance_text_model.{name}"] = buffer
        state_dict["guidance_text_projection.weight"] = clip_model.text_projection.weight
        state_dict["guidance_visual_projection.weight"] = clip_model.visual_projection.weight
    config = config_class(**config_dict, compression=compression)
    # Built on the meta device and filled by assignment: no second random initialisation of a multi-GB model.
    with torch.device("meta"):
        model = model_class(config)
    model.load_state_dict(state_dict, strict=True, assign=True)
    for name, buffer in buffers.items():  # non-persistent buffers are not in the state dict
        module_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(module_name), leaf, buffer)
    model.tie_weights()
    model.generation_config = stock.generation_config
    return stock.eval(), model.eval()


def with_guidance_tokenizer(processor, guidance_tokenizer):
    """The base's LLaVA processor plus CLIP's tokenizer for the question (a LlavaRCProcessor)."""
    from . import LlavaRCProcessor

    return LlavaRCProcessor(
        image_processor=processor.image_processor,
        tokenizer=processor.tokenizer,
        guidance_tokenizer=guidance_tokenizer,
        patch_size=processor.patch_size,
        vision_feature_select_strategy=processor.vision_feature_select_strategy,
        chat_template=processor.chat_template,
        num_additional_image_tokens=processor.num_additional_image_tokens,
    )


def write_repo(directory: Path, model, processor, card: str) -> None:
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    (directory / "README.md").write_text(card)
    config = json.loads((directory / "config.json").read_text())
    # The model's and its config's own files (the rest follow through their relative imports).
    required = [f"{type(item).__module__.rpartition('.')[2]}.py" for item in (model, model.config)]
    missing = [name for name in required if not (directory / name).is_file()]
    if "auto_map" not in config or missing:
        raise SystemExit(f"the written repo lacks auto_map or code files {missing}: llava_rc registration failed")


def verify_repo(directory: Path, stock, processor, compression: dict, model_type: str = "llava_rc") -> None:
    """Load ``directory`` through remote code in a fresh interpreter and compare with the stock model's output."""
    import torch
    from PIL import Image

    image_token = processor.image_token
    prompt = f"USER: {image_token}\nWhat is shown? ASSISTANT:"
    pixels = synthetic_pixels(processor)  # (H, W, 3) uint8
    inputs = processor(images=Image.fromarray(pixels.numpy()), text=prompt, return_tensors="pt")
    inputs["pixel_values"] = inputs["pixel_values"].to(stock.dtype)
    stock_inputs = {key: value for key, value in inputs.items() if not key.startswith("guidance_")}
    with torch.no_grad():
        sequences = stock.generate(**stock_inputs, max_new_tokens=VERIFY_MAX_NEW_TOKENS, do_sample=False)
    with tempfile.TemporaryDirectory(prefix="llava-rc-verify-") as scratch_name:
        scratch = Path(scratch_name)
        torch.save(
            {
                "image": pixels,
                "prompt": prompt,
                "input_ids": inputs["input_ids"],
                "sequences": sequences,
                "dtype": str(stock.dtype).removeprefix("torch."),
                "max_new_tokens": VERIFY_MAX_NEW_TOKENS,
                "on": VERIFY_COMPRESSION_ON,
            },
            scratch / "reference.pt",
        )
        arguments = [str(directory), str(scratch / "reference.pt")]
        result = run_without_llava_rc(VERIFY_SCRIPT, arguments, scratch, pause_step="verify")
    if result.returncode != 0:
        raise SystemExit(
            f"verification failed: the written repo does not load through remote code:\n{result.stderr[-4000:]}"
        )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    problems = []
    if report["model_type"] != model_type or not report["module"].startswith("transformers_modules"):
        problems.append(f"loaded {report['model_type']!r} from {report['module']!r}, expected remote-code {model_type}")
    if not report["inputs_equal"]:
        problems.append("the saved processor tokenises the test prompt differently from the base processor")
    if not report["off_equal"]:
        problems.append("greedy output with compression 'none' differs from the base model's")
    if report["on_new_tokens"] <= 0:
        problems.append("generation with compression on produced no tokens")
    if problems:
        raise SystemExit("verification failed: " + "; ".join(problems))


def run_without_llava_rc(
    script: str, arguments: list[str], workdir: Path, timeout: float | None = None, pause_step: str | None = None
) -> subprocess.CompletedProcess:
    """Run ``script`` in a fresh interpreter in ``workdir``, offline, where ``llava_rc`` cannot be imported.

    The process is killed (and waited for) when this call ends early: a timeout, Ctrl-C, SIGTERM (main()'s handler).
    ``pause_step``: the debug hook's step name for the time the process runs.
    """
    path = workdir / "isolated_script.py"
    path.write_text(BLOCK_LLAVA_RC + script)
    environment = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", PAUSE_ENVIRONMENT)}
    environment.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(workdir / "hf_modules"))
    command = [sys.executable, "-P", str(path), *arguments]
    with subprocess.Popen(
        command, cwd=workdir, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as process:
        try:
            if pause_step is not None:
                debug_pause(pause_step, f" (verification process {process.pid})")
            stdout, stderr = process.communicate(timeout=timeout)
        except BaseException:
            process.kill()  # the with block then waits for it
            raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def synthetic_pixels(processor):
    """A small deterministic RGB gradient (H, W, 3) uint8 tensor at the image processor's crop size (64 px if none)."""
    import torch

    size = getattr(processor.image_processor, "crop_size", None) or {}
    height, width = size.get("height", 64), size.get("width", 64)
    rows = (torch.arange(height) * 255 // max(height - 1, 1)).view(height, 1).expand(height, width)  # (H, W)
    cols = (torch.arange(width) * 255 // max(width - 1, 1)).view(1, width).expand(height, width)  # (H, W)
    return torch.stack([rows, cols, (rows + cols) // 2], dim=-1).to(torch.uint8)  # (H, W, 3)


def output_dir_problem(destination: Path, force: bool) -> str | None:
    """What makes ``destination`` unusable as --output-dir (the end of a sentence naming it), or None.

    Checked before any weights load: an existing destination must be a directory, empty unless ``force``; else the
    folder that will hold it must be makeable and writable, tried by making its missing ancestors and a probe folder
    in it, then removing what was made.
    """
    made = []
    try:
        if destination.exists():
            if not destination.is_dir():
                return "exists and is not a directory"
            if any(destination.iterdir()) and not force:
                return "is not empty; pass --force to replace it"
        existing = destination.parent
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            return f"cannot be created: {str(existing)!r} is a file, not a directory"
        for folder in reversed([destination.parent, *destination.parent.parents]):
            if not folder.exists():
                folder.mkdir()
                made.append(folder)
        os.rmdir(tempfile.mkdtemp(prefix=".llava-rc-upload-probe-", dir=destination.parent))
    except OSError as error:
        return f"cannot be created: {error.strerror or error} ({error.filename or destination.parent})"
    finally:
        for folder in reversed(made):
            os.rmdir(folder)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.output_dir is None and args.repo_id is None:
        parser.error("nothing to do: give --output-dir, --repo-id, or both")
    if args.base_model_id is not None and not is_hub_id(args.base_model_id):
        parser.error(f"--base-model-id expects a Hub repo id (ORG/NAME), got {args.base_model_id!r}")
    pause = os.environ.get(PAUSE_ENVIRONMENT)
    if pause and pause.partition(":")[0] not in PAUSE_STEPS:
        parser.error(f"{PAUSE_ENVIRONMENT}={pause!r}: expected STEP[:SECONDS] with STEP one of {PAUSE_STEPS}")
    compression = parse_settings(parser, args.method, args.settings, args.clip)
    print(guidance_statement(compression, args.clip), file=sys.stderr)
    destination = args.output_dir.resolve() if args.output_dir is not None else None
    if destination is not None:
        problem = output_dir_problem(destination, args.force)
        if problem:
            parser.error(f"--output-dir {str(destination)!r} {problem}")
    import huggingface_hub

    if args.repo_id is not None and huggingface_hub.get_token() is None:
        raise SystemExit(f"--repo-id {args.repo_id!r} needs Hub credentials: run `hf auth login` or set HF_TOKEN")
    base_config = check_base_config(args.base)
    if args.clip is not None:
        if base_config.model_type != "llava":
            raise SystemExit(
                f"--clip is supported for LLaVA-1.5 bases only (its processor adds CLIP's tokenizer); --base "
                f"{args.base!r} is {base_config.model_type!r}: leave --clip out ('llm' guidance)"
            )
        check_clip_config(args.clip, base_config)
    try:
        with sigterm_like_sigint():
            convert(args, compression, base_config.model_type, destination)
    except KeyboardInterrupt:
        # convert() has cleaned up on the way out; 130 is the shell's code for an interrupted command, whatever
        # signal disposition this process inherited.
        print("llava-rc-upload: interrupted; --output-dir holds the old repo or the new one, complete", file=sys.stderr)
        return 130
    print(f"done: {destination or args.repo_id}", file=sys.stderr)
    return 0


def convert(args: argparse.Namespace, compression: dict, model_type: str, destination: Path | None) -> None:
    """Load, convert, write to a staging folder, verify, move into ``destination`` and/or push (checked arguments)."""
    import torch
    from transformers import AutoProcessor, AutoTokenizer

    log(1, f"loading base {args.base} (dtype {args.dtype}) ...")
    debug_pause("load")
    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    processor = AutoProcessor.from_pretrained(args.base)
    if args.clip is not None:
        processor = with_guidance_tokenizer(processor, AutoTokenizer.from_pretrained(args.clip))
    stock, model = load_and_convert(args.base, dtype, compression, args.clip, model_type)
    config_class = family(model_type)[1]
    base_id = base_model_id(args.base, args.base_model_id)

    log(2, f"built {type(model).__name__} with compression {compression}")
    parent = destination.parent if destination is not None else None
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    staging = None
    try:
        with signals_held():  # the folder never exists without its name recorded for the cleanup
            staging = Path(tempfile.mkdtemp(prefix=".llava-rc-upload-", dir=parent))
        repo_name = args.repo_id or (destination.name if destination is not None else "llava-rc")
        log(3, f"writing repo to {staging} ...")
        write_repo(staging, model, processor, model_card(base_id, compression, base_license(args.base), repo_name))
        del model
        debug_pause("write")

        log(4, "verifying the repo in a fresh process through remote code ...")
        verify_repo(staging, stock, processor, compression, config_class.model_type)

        folder = staging
        if destination is not None:
            log(5, f"moving into {destination}")
            replace_directory(staging, destination)
            folder = destination
        if args.repo_id is not None:
            from huggingface_hub import HfApi

            log(5, f"pushing to {args.repo_id} ...")
            debug_pause("push")
            api = HfApi()
            api.create_repo(args.repo_id, private=args.private, exist_ok=True)
            source = base_id or "a local checkpoint"
            api.upload_folder(
                repo_id=args.repo_id,
                folder_path=str(folder),
                revision=args.revision,
                commit_message=args.commit_message or f"Upload LLaVA-RC ({compression['method']}) from {source}",
                allow_patterns=UPLOAD_PATTERNS,
            )
    finally:
        if staging is not None and staging.exists():
            with signals_held():
                shutil.rmtree(staging, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
