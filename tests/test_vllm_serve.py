"""`vllm serve` with the plugin: one real HTTP chat-completions request carrying an image (loopback only), a bad
compression setting answered with a 400 while the server keeps serving, and the server stopped by the test."""

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from vllm_common import SAMPLES, SHIPPED, Reference, import_vllm

import_vllm()

from PIL import Image  # noqa: E402

COMPRESSION = {"method": "cls_attention", "budget": 12}
START_TIMEOUT_S = 420


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def post(url: str, body: dict, timeout: float = 120.0) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = free_port()
    log_path = tmp_path_factory.mktemp("serve") / "server.log"
    command = [
        sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", str(SHIPPED), "--trust-remote-code",
        "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "512",
        "--enforce-eager", "--max-num-seqs", "4", "--trust-request-mm-kwargs", "--hf-overrides",
        json.dumps({"compression": COMPRESSION}),
    ]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"vllm serve exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vllm serve did not answer /health in {START_TIMEOUT_S} s:\n{log_path.read_text()[-4000:]}")
            time.sleep(2)
        yield base, process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)  # the server's own process group (start_new_session)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)


def chat_body(image: Image.Image, question: str, **extra) -> dict:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    return {
        "model": str(SHIPPED),
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question},
        ]}],
        "max_tokens": 6,
        "temperature": 0.0,
        **extra,
    }


def expected_answer(image: Image.Image, question: str, compression: dict) -> str:
    reference = Reference(SHIPPED)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = reference.processor.apply_chat_template(messages, add_generation_prompt=True)
    ids, _, _ = reference(prompt, image, compression=compression)
    return reference.processor.tokenizer.decode(ids, skip_special_tokens=True).strip()


def test_chat_completion_with_an_image_over_http_then_a_bad_setting_then_serving_again(server):
    base, process = server
    image = Image.open(SAMPLES / "test-390.png").convert("RGB")
    question = "what shape is in the image?"

    status, answer = post(f"{base}/v1/chat/completions", chat_body(image, question))
    assert status == 200, answer
    text = answer["choices"][0]["message"]["content"].strip()
    assert text == expected_answer(image, question, COMPRESSION)
    # The compressed prompt: 12 image tokens instead of 144.
    assert answer["usage"]["prompt_tokens"] < 144

    status, error = post(
        f"{base}/v1/chat/completions",
        chat_body(image, question, mm_processor_kwargs={"compression": {"method": "nope"}}),
    )
    assert status == 400, error
    assert "unknown compression method 'nope'" in json.dumps(error)

    override = {"method": "random", "budget": 4}
    status, answer = post(
        f"{base}/v1/chat/completions", chat_body(image, question, mm_processor_kwargs={"compression": override})
    )
    assert status == 200, answer
    assert answer["choices"][0]["message"]["content"].strip() == expected_answer(image, question, override)
    assert process.poll() is None
