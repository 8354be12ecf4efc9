"""The AOT memory planner: real train step, simulated mesh, numbers that add up."""
import jax
import pytest

from prompt_tuning.scripts import memory_plan

GIB = 1024 ** 3
SMALL = ["--gin_file=models/t5_1_1_small.gin", "--mesh", "data=2,model=2", "--batch", "8",
         "--inputs", "64", "--targets", "8", "--prompt", "10", "--json"]


@pytest.fixture(autouse=True)
def _four_devices():
  if jax.device_count() < 4:
    pytest.skip("needs 4 (simulated) devices")


def test_small_plan_on_a_2x2_mesh_adds_up(capsys):
  report = memory_plan.main(SMALL)
  assert capsys.readouterr().out.strip().startswith("{")  # --json: one JSON object
  b = report["per_device_bytes"]
  # Arguments are the hand-computed shards: frozen weights, prompt + Adafactor, batch (XLA
  # may drop a few unused scalars of the optimizer state).
  assert abs(b["arguments"] - (b["parameters"] + b["prompt_and_optimizer"] + b["batch"])) < 64
  # T5 1.1 Small in float32 is 77M parameters: with 1-D partitioning over model=2 every
  # weight but the norms and relative position tables is halved.
  assert 0.45 * 4 * report["num_parameters"] < b["parameters"] < 0.55 * 4 * report["num_parameters"]
  assert b["temporaries"] > 0 and b["total"] == b["arguments"] + b["temporaries"]
  assert report["fits"] and report["flops_per_device"] > 0
  assert b["cpu_weight_copies"] == 0  # float32 weights: nothing to upcast


def test_scan_with_remat_and_bf16_weights_shrink_the_plan(capsys):
  base = memory_plan.main(SMALL)["per_device_bytes"]
  lean = memory_plan.main(SMALL + ["--scan", "--remat", "full", "--frozen_dtype", "bfloat16",
                                   "--matmul_dtype", "bfloat16"])
  b = lean["per_device_bytes"]
  assert b["parameters"] * 2 == base["parameters"]  # bfloat16 storage
  assert lean["scan"] and lean["remat"] == "full"
  # Scanned, rematerialised layers keep one layer input per layer instead of every activation;
  # XLA:CPU's float32 copies of the bfloat16 weights are reported separately.
  assert b["temporaries"] - b["cpu_weight_copies"] < base["temporaries"]
  assert b["total_on_accelerators"] == b["total"] - b["cpu_weight_copies"]
  capsys.readouterr()


def test_mesh_and_batch_errors_are_clear():
  with pytest.raises(ValueError, match="data=4,model=4"):
    memory_plan.parse_mesh("data=4,tensor=4")
  with pytest.raises(ValueError, match="not divisible"):
    memory_plan.main(SMALL[:-1] + ["--batch", "3"])
  # T5 1.1 Small has 6 heads: a model-parallel size of 4 cannot split them.
  with pytest.raises(ValueError, match="divides the number of heads"):
    memory_plan.main([a.replace("data=2,model=2", "data=1,model=4") for a in SMALL])
