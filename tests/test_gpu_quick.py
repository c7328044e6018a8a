"""benchmarks/gpu_quick.sh: its steps' time limits add up to less than its budget, so no step is starved."""

import re
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_quick.sh"


def test_step_limits_fit_the_cuda_budget():
    text = SCRIPT.read_text()
    budget = int(re.search(r"budget=\$\{QUICK_BUDGET_S:-(\d+)\}; scale=1", text).group(1))
    limits = {name: int(limit) for name, limit in re.findall(r"^step (\w+) (\d+) ", text, flags=re.MULTILINE)}
    assert {"a_ttft_llava15", "b_step_compile", "e_gpu_tests"} <= set(limits), limits
    assert sum(limits.values()) < budget, f"step limits {limits} add up to {sum(limits.values())} s, budget {budget} s"
    assert budget + 10 < 360, f"the budget {budget} s leaves no room (env.txt, start-up) under 6 minutes"
    assert next(iter(limits)) == "a_ttft_llava15", "TTFT stock vs RC at 7B geometry must come first"
