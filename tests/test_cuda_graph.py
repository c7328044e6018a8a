"""A fixed-budget step captured in one CUDA graph replays equal to eager (GPU only).

On CPU, ``tests/test_compile.py`` is the proxy: ``torch.compile(fullgraph=True)`` raises on a graph break, and a host
sync or a value-dependent shape is one. Here the real thing: the method and ``apply_plan`` are captured in a
``torch.cuda.CUDAGraph`` (capture fails on any host sync), the graph is replayed on new inputs copied into the
captured tensors, and its outputs must equal an eager call on those inputs.
"""

import dataclasses

import pytest
import torch

from llava_rc.compression_common import CompressionInputs, apply_plan
from llava_rc.compression_registry import method_function, parse_compression
from test_compression_methods import make_inputs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

FIXED_BUDGET = {
    "rc-16": {"method": "rc", "budget": 16},
    "rc-0.3": {"method": "rc", "budget": 0.3},
    "prumerge-12": {"method": "prumerge", "budget": 12},
    "prumerge_plus-12": {"method": "prumerge_plus", "budget": 12},
    "cls_attention-16": {"method": "cls_attention", "budget": 16},
}


def on_cuda(inputs: CompressionInputs) -> CompressionInputs:
    fields = {field.name: getattr(inputs, field.name) for field in dataclasses.fields(inputs)}
    return CompressionInputs(**{name: value.cuda() if torch.is_tensor(value) else value
                                for name, value in fields.items()})


@pytest.mark.parametrize("name", sorted(FIXED_BUDGET))
def test_fixed_budget_step_replays_in_one_cuda_graph(name):
    config = parse_compression(FIXED_BUDGET[name])
    function = method_function(config)
    static = on_cuda(make_inputs(num_images=3, grid=(12, 12), seed=1))

    def step():
        plan = function(static, config)
        return plan.source_index, plan.counts, apply_plan(static.features, plan)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture (lazy initialisations)
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # raises on a host sync
        captured = step()

    for seed in (2, 3):
        fresh = on_cuda(make_inputs(num_images=3, grid=(12, 12), seed=seed))
        for field in dataclasses.fields(static):
            if torch.is_tensor(getattr(static, field.name)):
                getattr(static, field.name).copy_(getattr(fresh, field.name))
        graph.replay()
        eager = function(fresh, config)
        assert torch.equal(captured[0], eager.source_index)
        assert torch.equal(captured[1], eager.counts)
        torch.testing.assert_close(captured[2], apply_plan(fresh.features, eager), rtol=1e-5, atol=1e-5)
