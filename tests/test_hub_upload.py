"""llava-rc-upload: stock LLaVA checkpoints (current and pre-4.52 key layouts) become verified remote-code repos.

No network exists here: pushing is tested by replacing ``huggingface_hub.HfApi`` (the tool imports it when it pushes)
with a recording fake, and credentials by replacing ``huggingface_hub.get_token``.
"""

import ast
import json
import textwrap
from pathlib import Path

import huggingface_hub
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import CLIPConfig, CLIPModel, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

import llava_rc.hub_upload as hub_upload
from llava_rc.hub_upload import run_without_llava_rc
from tiny import PAD_TOKEN_ID, make_batch, tiny_config_dict, tiny_processor, tiny_tokenizer

# Current (in-memory) key prefixes -> the pre-4.52 llava layout.
OLD_LAYOUT = [
    ("lm_head.", "language_model.lm_head."),
    ("model.language_model.", "language_model.model."),
    ("model.vision_tower.", "vision_tower.vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
]

CHECKER = textwrap.dedent(
    """
    import json, sys
    import torch
    from transformers import AutoModelForImageTextToText

    reports = []
    for repo, reference_path in zip(sys.argv[1::2], sys.argv[2::2]):
        reference = torch.load(reference_path)
        model = AutoModelForImageTextToText.from_pretrained(repo, trust_remote_code=True).eval()
        out = model.generate(**reference["batch"], compression={"method": "none"}, max_new_tokens=5, do_sample=False,
                             pad_token_id=reference["pad_token_id"])
        reports.append({
            "model_type": model.config.model_type,
            "auto_map": model.config.auto_map,
            "compression": model.config.compression,
            "module": type(model).__module__,
            "lm_head_equal": torch.equal(model.lm_head.weight, reference["lm_head"]),
            "sequences_equal": torch.equal(out, reference["sequences"]),
        })
    print(json.dumps(reports))
    """
)


class FakeHfApi:
    """Records the calls the tool makes on the Hub client."""

    calls: list = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        kwargs["files"] = sorted(path.name for path in Path(kwargs["folder_path"]).iterdir())
        self.calls.append(("upload_folder", kwargs["repo_id"], kwargs))


def save_base(directory: Path, old_layout: bool) -> LlavaForConditionalGeneration:
    """A tiny stock LLaVA checkpoint + processor; the old layout rewrites the current-layout safetensors."""
    torch.manual_seed(1)
    model = LlavaForConditionalGeneration(LlavaConfig(**tiny_config_dict())).eval()
    model.save_pretrained(directory, save_original_format=False)
    tiny_processor().save_pretrained(directory)
    weights_path = directory / "model.safetensors"
    weights = load_file(weights_path)
    assert set(weights) == set(model.state_dict())
    assert {key.split(".")[0] for key in weights} == {"model", "lm_head"}
    if old_layout:
        renamed = {}
        for key, tensor in weights.items():
            new_prefix, old_prefix = next(pair for pair in OLD_LAYOUT if key.startswith(pair[0]))
            renamed[old_prefix + key.removeprefix(new_prefix)] = tensor
        save_file(renamed, weights_path, metadata={"format": "pt"})
        assert "language_model.lm_head.weight" in renamed
        reloaded = LlavaForConditionalGeneration.from_pretrained(directory)
        assert torch.equal(reloaded.lm_head.weight, model.lm_head.weight)
    return model


def reference_for(model: LlavaForConditionalGeneration, path: Path) -> Path:
    batch = make_batch([4, 7], [1, 1], seed=5)
    sequences = model.generate(**batch, max_new_tokens=5, do_sample=False, pad_token_id=PAD_TOKEN_ID)
    torch.save(
        {
            "batch": batch,
            "sequences": sequences,
            "lm_head": model.lm_head.weight.detach(),
            "pad_token_id": PAD_TOKEN_ID,
        },
        path,
    )
    return path


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Both layouts through main(): the current layout saved locally, the old one saved and pushed (fake client)."""
    root = tmp_path_factory.mktemp("upload")
    new_base, old_base = root / "base_new", root / "base_old"
    new_model = save_base(new_base, old_layout=False)
    old_model = save_base(old_base, old_layout=True)
    (old_base / "README.md").write_text("---\nlicense: mit\n---\n# tiny\n")
    FakeHfApi.calls = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(huggingface_hub, "HfApi", FakeHfApi)
        patch.setattr(huggingface_hub, "get_token", lambda: "hf_fake")
        new_argv = ["--base", str(new_base), "--method", "none", "--output-dir", str(root / "out_new")]
        assert hub_upload.main(new_argv) == 0
        assert hub_upload.main([
            "--base", str(old_base), "--method", "cls_attention", "--set", "budget=5",
            "--output-dir", str(root / "out_old"), "--repo-id", "org/tiny-rc", "--private", "--revision", "dev",
            "--base-model-id", "org/tiny-llava",
        ]) == 0
    return {
        "root": root,
        "new": (root / "out_new", reference_for(new_model, root / "new.pt")),
        "old": (root / "out_old", reference_for(old_model, root / "old.pt")),
        "calls": list(FakeHfApi.calls),
    }


@pytest.mark.slow
def test_converted_repos_load_through_remote_code_and_match_stock(converted):
    arguments = [str(item) for name in ("new", "old") for item in converted[name]]
    result = run_without_llava_rc(CHECKER, arguments, converted["root"], timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    new, old = json.loads(result.stdout.strip().splitlines()[-1])
    for report in (new, old):
        assert report["model_type"] == "llava_rc"
        assert report["auto_map"]["AutoModelForImageTextToText"] == "modeling_llava_rc.LlavaRCForConditionalGeneration"
        assert report["module"].startswith("transformers_modules")
        assert report["lm_head_equal"], "lm_head was re-initialised"
        assert report["sequences_equal"]
    assert new["compression"] == {"method": "none"}
    assert old["compression"]["method"] == "cls_attention" and old["compression"]["budget"] == 5


@pytest.mark.slow
def test_written_repo_files_and_model_card(converted):
    directory = converted["old"][0]
    names = {path.name for path in directory.iterdir()}
    assert {"config.json", "model.safetensors", "configuration_llava_rc.py", "modeling_llava_rc.py",
            "processor_config.json", "tokenizer.json", "README.md"} <= names
    assert "hub_upload.py" not in names
    card = (directory / "README.md").read_text()
    assert "pipeline_tag: image-text-to-text" in card and "library_name: transformers" in card
    assert "license: mit" in card and "2409.01179" in card and "trust_remote_code=True" in card
    assert "base_model: org/tiny-llava" in card and "(https://huggingface.co/org/tiny-llava)" in card
    new_card = (converted["new"][0] / "README.md").read_text()
    assert "license: other" in new_card
    # A local base without a recorded Hub id: no base_model at all, and its path appears nowhere.
    assert "base_model" not in new_card and str(converted["root"]) not in new_card and "base_new" not in new_card
    assert not [path for path in converted["root"].iterdir() if path.name.startswith(".llava-rc-upload-")]


@pytest.mark.slow
def test_push_calls_the_hub_client_with_the_verified_folder(converted):
    (create, repo_id, create_kwargs), (upload, upload_repo_id, upload_kwargs) = converted["calls"]
    assert (create, repo_id, upload, upload_repo_id) == ("create_repo", "org/tiny-rc", "upload_folder", "org/tiny-rc")
    assert create_kwargs == {"private": True, "exist_ok": True}
    assert Path(upload_kwargs["folder_path"]) == converted["old"][0].resolve()
    assert upload_kwargs["revision"] == "dev"
    assert upload_kwargs["allow_patterns"] == hub_upload.UPLOAD_PATTERNS
    assert "token" not in upload_kwargs and "token" not in create_kwargs
    assert "model.safetensors" in upload_kwargs["files"] and "modeling_llava_rc.py" in upload_kwargs["files"]


@pytest.fixture
def no_weights(monkeypatch, tmp_path):
    """Bad inputs must be rejected before any weights are loaded or anything is pushed."""

    class Refuse:
        @staticmethod
        def from_pretrained(*args, **kwargs):
            raise AssertionError("weights were loaded before the inputs were validated")

    monkeypatch.setattr(transformers, "LlavaForConditionalGeneration", Refuse)
    monkeypatch.setattr(huggingface_hub, "HfApi", None)
    base = tmp_path / "base"
    LlavaConfig(**tiny_config_dict()).save_pretrained(base)  # a config alone: enough for every fast check
    return base


def failure_message(argv, capsys) -> str:
    with pytest.raises(SystemExit) as raised:
        hub_upload.main(argv)
    assert raised.value.code != 0
    return str(raised.value.code) + capsys.readouterr().err


def test_rejects_non_llava_base(no_weights, tmp_path, capsys):
    llama = tmp_path / "llama"
    LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4).save_pretrained(llama)
    message = failure_message(["--base", str(llama), "--output-dir", str(tmp_path / "out")], capsys)
    assert "'llama'" in message and "llava" in message


@pytest.mark.parametrize(
    "settings, expected",
    [
        (["--method", "bogus"], "bogus"),
        (["--method", "cls_attention", "--set", "colour=red"], "colour"),
        (["--method", "cls_attention", "--set", "budget"], "KEY=VALUE"),
        (["--method", "cls_attention", "--set", "budget=-3"], "budget"),
    ],
)
def test_rejects_bad_compression(no_weights, tmp_path, capsys, settings, expected):
    message = failure_message(["--base", str(no_weights), *settings, "--output-dir", str(tmp_path / "out")], capsys)
    assert expected in message


def test_rejects_non_empty_output_dir_without_force(no_weights, tmp_path, capsys):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    message = failure_message(["--base", str(no_weights), "--output-dir", str(output)], capsys)
    assert "--force" in message and (output / "keep.txt").read_text() == "mine"


def test_rejects_push_without_credentials(no_weights, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    message = failure_message(["--base", str(no_weights), "--repo-id", "org/name"], capsys)
    assert "org/name" in message and "HF_TOKEN" in message


def test_requires_a_destination(no_weights, capsys):
    assert "--output-dir" in failure_message(["--base", str(no_weights)], capsys)


def test_method_defaults_to_the_config_default_and_help_lists_every_method():
    from llava_rc import METHODS, LlavaRCConfig

    parser = hub_upload.build_parser()
    assert hub_upload.DEFAULT_METHOD == LlavaRCConfig().compression["method"]
    assert hub_upload.parse_settings(parser, None, [])["method"] == LlavaRCConfig().compression["method"]
    assert sorted(hub_upload.METHOD_NAMES) == sorted(METHODS)


def test_set_values_are_parsed_as_json():
    assert hub_upload.parse_value("64") == 64 and hub_upload.parse_value("0.1") == 0.1
    assert hub_upload.parse_value("llm") == "llm" and hub_upload.parse_value("null") is None


def test_failed_verification_moves_and_pushes_nothing(tmp_path, monkeypatch):
    base = tmp_path / "base"
    save_base(base, old_layout=False)
    monkeypatch.setattr(hub_upload, "VERIFY_SCRIPT", "raise SystemExit('broken on purpose')")
    monkeypatch.setattr(huggingface_hub, "HfApi", None)  # any push attempt would fail with a TypeError
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_fake")
    with pytest.raises(SystemExit, match="verification failed"):
        hub_upload.main(["--base", str(base), "--output-dir", str(tmp_path / "out"), "--repo-id", "org/name"])
    assert not (tmp_path / "out").exists()
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".llava-rc-upload-")]


def save_clip(directory: Path, vision_width: int = 32) -> CLIPModel:
    """A tiny CLIP model (text tower, projections) and its tokenizer, as --clip expects."""
    torch.manual_seed(2)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=tiny_tokenizer().vocab_size + 2, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=32, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        ),
        vision_config=dict(
            hidden_size=vision_width, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            image_size=28, patch_size=7,
        ),
        projection_dim=16,
    )
    model = CLIPModel(config).eval()
    model.save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return model


@pytest.mark.slow
def test_clip_adds_guidance_tower_projections_and_tokenizer(tmp_path):
    """--clip: the repo carries CLIP's text tower and projections and a LlavaRCProcessor with CLIP's tokenizer,
    text-guided methods default to "clip" guidance, and main() verified it in a fresh process (remote code)."""
    base, clip, output = tmp_path / "base", tmp_path / "clip", tmp_path / "out"
    save_base(base, old_layout=False)
    clip_model = save_clip(clip)
    assert hub_upload.main(["--base", str(base), "--clip", str(clip), "--output-dir", str(output)]) == 0
    config = json.loads((output / "config.json").read_text())
    assert config["compression"]["method"] == "rc" and config["compression"]["guidance"] == "clip"
    assert config["guidance_projection_dim"] == 16 and config["guidance_text_config"]["hidden_size"] == 32
    assert (output / "guidance_tokenizer").is_dir() and (output / "processing_llava_rc.py").is_file()
    weights = load_file(output / "model.safetensors")
    assert torch.equal(weights["guidance_text_projection.weight"], clip_model.text_projection.weight)
    assert torch.equal(weights["guidance_visual_projection.weight"], clip_model.visual_projection.weight)
    text_weight = "guidance_text_model.embeddings.token_embedding.weight"
    assert torch.equal(weights[text_weight], clip_model.text_model.embeddings.token_embedding.weight)


def test_rejects_clip_that_does_not_fit_the_vision_tower(no_weights, tmp_path, capsys):
    clip = tmp_path / "clip"
    save_clip(clip, vision_width=48)
    argv = ["--base", str(no_weights), "--clip", str(clip), "--output-dir", str(tmp_path / "out")]
    message = failure_message(argv, capsys)
    assert "48-wide" in message and "32 wide" in message


def test_clip_guidance_without_clip_is_rejected(no_weights, tmp_path, capsys):
    argv = ["--base", str(no_weights), "--set", "guidance=clip", "--output-dir", str(tmp_path / "out")]
    assert "pass --clip" in failure_message(argv, capsys)


def test_set_method_that_contradicts_method_is_an_error(no_weights, tmp_path, capsys):
    argv = ["--base", str(no_weights), "--method", "rc", "--set", "method=gprune", "--output-dir", str(tmp_path / "o")]
    message = failure_message(argv, capsys)
    assert "method='gprune'" in message and "--method 'rc'" in message


def test_set_keys_update_the_chosen_methods_defaults():
    from llava_rc import parse_compression

    parser = hub_upload.build_parser()
    rc_defaults = parse_compression({"method": "rc"}).to_dict()
    assert hub_upload.parse_settings(parser, "rc", ["budget=8"]) == {**rc_defaults, "budget": 8}
    assert hub_upload.parse_settings(parser, "rc", ["method=rc", "budget=8"]) == {**rc_defaults, "budget": 8}
    # Without --method, a --set method=... names the method; its own defaults are the starting point.
    gprune = hub_upload.parse_settings(parser, None, ["method=gprune", "budget=4"])
    assert gprune == {**parse_compression({"method": "gprune"}).to_dict(), "budget": 4}


def test_base_model_id_is_never_a_local_path(tmp_path):
    local = tmp_path / "base"
    local.mkdir()
    (local / "config.json").write_text(json.dumps({"model_type": "llava"}))
    assert hub_upload.base_model_id(str(local), None) is None
    assert hub_upload.base_model_id(str(local), "org/given") == "org/given"
    assert hub_upload.base_model_id("llava-hf/llava-1.5-7b-hf", None) == "llava-hf/llava-1.5-7b-hf"
    for recorded, expected in [
        ("llava-hf/llava-1.5-7b-hf", "llava-hf/llava-1.5-7b-hf"),
        (str(tmp_path / "elsewhere"), None),
        ("./checkpoints/llava", None),
        ("~/models/llava", None),
        ("C:\\models\\llava", None),
        ("", None),
    ]:
        (local / "config.json").write_text(json.dumps({"model_type": "llava", "_name_or_path": recorded}))
        assert hub_upload.base_model_id(str(local), None) == expected, recorded
    card = hub_upload.model_card(None, {"method": "none"}, "other", "org/name")
    assert "base_model" not in card
    assert "base_model: org/base\n" in hub_upload.model_card("org/base", {"method": "none"}, "other", "org/name")


def test_rejects_a_base_model_id_that_is_a_path(no_weights, tmp_path, capsys):
    argv = ["--base", str(no_weights), "--base-model-id", str(tmp_path), "--output-dir", str(tmp_path / "out")]
    message = failure_message(argv, capsys)
    assert "--base-model-id" in message and str(tmp_path) in message


def repo_snapshot(directory: Path) -> dict:
    return {str(path.relative_to(directory)): path.read_bytes() for path in directory.rglob("*") if path.is_file()}


def make_folder(directory: Path, text: str) -> dict:
    (directory / "sub").mkdir(parents=True)
    (directory / "config.json").write_text(text)
    (directory / "sub" / "weights.bin").write_bytes(text.encode() * 100)
    return repo_snapshot(directory)


def test_replace_directory_swaps_and_leaves_nothing_aside(tmp_path):
    old = make_folder(tmp_path / "out", "old")
    new = make_folder(tmp_path / "staging", "new")
    hub_upload.replace_directory(tmp_path / "staging", tmp_path / "out")
    assert repo_snapshot(tmp_path / "out") == new and new != old
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]
    new_again = make_folder(tmp_path / "staging", "newer")
    hub_upload.replace_directory(tmp_path / "staging", tmp_path / "absent")
    assert repo_snapshot(tmp_path / "absent") == new_again


def test_replace_directory_restores_the_old_repo_when_the_move_fails(tmp_path, monkeypatch):
    old = make_folder(tmp_path / "out", "old")
    make_folder(tmp_path / "staging", "new")
    real_replace = hub_upload.os.replace

    def replace_failing_for_staging(source, target):
        if Path(source) == tmp_path / "staging":
            raise OSError("disk full (simulated)")
        real_replace(source, target)

    monkeypatch.setattr(hub_upload.os, "replace", replace_failing_for_staging)
    with pytest.raises(OSError, match="simulated"):
        hub_upload.replace_directory(tmp_path / "staging", tmp_path / "out")
    assert repo_snapshot(tmp_path / "out") == old
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out", "staging"]  # the caller removes staging


def test_signals_held_delivers_a_held_signal_when_the_block_ends():
    import signal

    # Python's own Ctrl-C handler, whatever this process inherited (a background job starts with SIGINT ignored).
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        events = []
        with pytest.raises(KeyboardInterrupt):
            with hub_upload.signals_held():
                signal.raise_signal(signal.SIGINT)
                events.append("block finished")
        assert events == ["block finished"]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, inherited)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--method", "rc"], "text guidance: none. 'rc' has guidance='auto'"),
        (["--method", "trsm"], "text guidance: none. 'trsm' has guidance='auto'"),
        (["--method", "trsm", "--set", "guidance=llm"], "text guidance: 'llm'"),
        (["--method", "rc", "--set", "guidance=null"], "text guidance: none (guidance=None, as set)"),
        (["--method", "gprune"], "text guidance: none ('gprune' does not read the question)"),
    ],
)
def test_upload_without_clip_states_the_text_guidance(no_weights, tmp_path, monkeypatch, capsys, argv, expected):
    """The statement comes first, before any failure later on (here: no credentials for the push)."""
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    message = failure_message(["--base", str(no_weights), *argv, "--repo-id", "org/name"], capsys)
    assert expected in message


def test_guidance_statement_with_clip():
    from llava_rc import parse_compression

    parser = hub_upload.build_parser()
    settings = hub_upload.parse_settings(parser, "rc", [], clip="openai/clip")
    assert hub_upload.guidance_statement(settings, "openai/clip") == (
        "text guidance: 'clip' (the text tower and projections of --clip openai/clip)"
    )
    assert hub_upload.guidance_statement(parse_compression({"method": "trsm"}).to_dict(), "c").startswith(
        "text guidance: 'clip'"
    )


@pytest.mark.slow
def test_model_card_usage_snippet_runs_as_written(converted):
    """The card's Python block runs unchanged in a fresh process (``repo`` is the folder's name, so it runs from the
    folder above), formats its prompt with the processor's chat template, and prints the answer."""
    directory = converted["new"][0]
    card = (directory / "README.md").read_text()
    snippet = card.split("```python\n")[1].split("```")[0]
    assert f'repo = "{directory.name}"' in snippet
    assert "apply_chat_template" in snippet and "USER:" not in snippet
    result = run_without_llava_rc(snippet, [], directory.parent, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    answer = ast.literal_eval(result.stdout.strip().splitlines()[-1])
    assert isinstance(answer, list) and len(answer) == 1 and isinstance(answer[0], str), result.stdout
    assert "not formatted as a chat" not in result.stderr
