r"""Per-device memory of the real prompt-tuning train step, without the hardware.

  python -m prompt_tuning.scripts.memory_plan --gin_file=models/t5_1_1_xxl.gin \
      --mesh data=4,model=4 --batch 32 --inputs 512 --targets 8 --prompt 100 \
      --scan --remat full --dtype bfloat16 --frozen_dtype bfloat16

Builds the model from a gin model file, places abstract parameters, prompt, optimizer state and
batch (`jax.ShapeDtypeStruct`s with `NamedSharding`s, nothing allocated) on a simulated
`('data', 'model')` mesh of CPU devices, AOT-compiles `train_lib.jit_train_step` (the step
training runs) and prints XLA's per-device memory analysis:

  parameters   frozen weights (argument bytes, equal to the hand-computed shard sizes)
  prompt+opt   the trainable prompt and its Adafactor state
  batch        the step's input tokens
  temporaries  XLA's temp buffers: activations kept for the backward pass, workspace
  total        argument + temp bytes (XLA:CPU's `peak_memory_in_bytes` leaves temps out)

Caveats of planning on XLA:CPU (DESIGN.md): remat of unrolled layers shows no saving on CPU
(its optimisation barriers are gone after optimisation), so plan remat with `--scan`. XLA:CPU
also upcasts bfloat16 weights carried through `scan` to float32 copies held in temporaries; GPUs
and TPUs make no such copies, so the plan counts them (`cpu_weight_copy_bytes`) and reports the
total with and without them. FLOPs from `cost_analysis` count a scanned body once.

Needs as many (simulated) devices as the mesh has: the script sets
`XLA_FLAGS=--xla_force_host_platform_device_count=N` itself, re-executing if jax already started.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from typing import Sequence

GIB = 1024 ** 3
_REEXEC = "PROMPT_TUNING_MEMORY_PLAN_REEXEC"


def parse_mesh(text: str) -> tuple[int, int]:
  """`data=4,model=4` -> (4, 4)."""
  sizes = {"data": 1, "model": 1}
  for part in text.split(","):
    name, _, value = part.partition("=")
    if name.strip() not in sizes or not value.strip().isdigit() or int(value) <= 0:
      raise ValueError(f"--mesh {text!r}: expected e.g. data=4,model=4")
    sizes[name.strip()] = int(value)
  return sizes["data"], sizes["model"]


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--gin_file", required=True, help="a model gin file, e.g. models/t5_1_1_xxl.gin")
  p.add_argument("--mesh", default="data=4,model=4")
  p.add_argument("--batch", type=int, default=32, help="global batch size")
  p.add_argument("--inputs", type=int, default=512, help="encoder input tokens (prompt excluded)")
  p.add_argument("--targets", type=int, default=8)
  p.add_argument("--prompt", type=int, default=100)
  p.add_argument("--scan", action="store_true", help="scanned layers (T5Config.scan_layers)")
  p.add_argument("--remat", choices=("none", "full", "dots"), default="none")
  p.add_argument("--dtype", default=None, help="activation dtype (default: the gin file's)")
  p.add_argument("--matmul_dtype", default=None, help="T5Config.matmul_dtype, e.g. bfloat16")
  p.add_argument("--frozen_dtype", default="float32", help="storage of the frozen weights")
  p.add_argument("--parameter_partitioning_dims", type=int, choices=(1, 2), default=1)
  p.add_argument("--num_microbatches", type=int, default=1)
  p.add_argument("--device_gib", type=float, default=16.0, help="memory per device to fit")
  p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
  return p


def _ensure_devices(n: int, argv: Sequence[str]) -> None:
  """Makes jax see `n` CPU devices: sets XLA_FLAGS before the backend starts, else re-executes."""
  flag = f"--xla_force_host_platform_device_count={n}"
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} {flag}".strip()
  import jax
  if jax.device_count() >= n:
    return
  if os.environ.get(_REEXEC):
    raise RuntimeError(f"The mesh needs {n} devices but jax sees {jax.device_count()}; run with "
                       f"XLA_FLAGS={flag}")
  env = dict(os.environ, XLA_FLAGS=" ".join(
      [f for f in flags.split() if "xla_force_host_platform_device_count" not in f] + [flag]),
      **{_REEXEC: "1"})
  os.execve(sys.executable, [sys.executable, "-m", "prompt_tuning.scripts.memory_plan",
                             *argv], env)


def _flat(shapes, shardings):
  import flax
  flat_s = flax.traverse_util.flatten_dict(shapes, sep="/")
  flat_sh = flax.traverse_util.flatten_dict(shardings, sep="/")
  return [(k, (flat_s[k], flat_sh[k])) for k in flat_s]


def _divides(shape, sharding) -> bool:
  try:
    sharding.shard_shape(tuple(shape))
  except ValueError:  # jax's IndivisibleError
    return False
  return True


def _shard_bytes(shape, dtype, sharding) -> int:
  import numpy as np
  return int(np.prod(sharding.shard_shape(tuple(shape)), dtype=np.int64)) * np.dtype(dtype).itemsize


_PARAM = re.compile(r"^\s+%([\w.\-]+) = (\w+)\[([\d,]*)\]\S* parameter\(")
_UPCAST = re.compile(r"^\s+%[\w.\-]+ = f32\[([\d,]*)\]\S* "
                     r"(?:convert\(%([\w.\-]+)\)|fusion\(%([\w.\-]+)\), kind=kLoop, "
                     r"calls=%wrapped_convert)")


def cpu_weight_copy_bytes(hlo_text: str) -> int:
  """Bytes of float32 copies that XLA:CPU makes of whole low-precision parameters.

  XLA:CPU upcasts bfloat16 weights to float32 for its dots and, for weights carried through a
  `scan` (while loop), hoists the converts to the entry: a float32 copy of every stacked
  bfloat16 weight, which GPUs and TPUs (native bfloat16) never make. Counted once per
  parameter, in the optimised per-device HLO.
  """
  entry = hlo_text[hlo_text.find("\nENTRY"):]
  params = {}
  for line in entry.splitlines():
    m = _PARAM.match(line)
    if m:
      params[m.group(1)] = (m.group(2), m.group(3))
  copied = {}
  for line in entry.splitlines():
    m = _UPCAST.match(line)
    if not m:
      continue
    name = m.group(2) or m.group(3)
    dtype, dims = params.get(name, (None, None))
    if dtype in ("bf16", "f16") and dims == m.group(1) and dims:
      copied[name] = math.prod(int(d) for d in dims.split(",")) * 4
  return sum(copied.values())


def plan(args: argparse.Namespace) -> dict:
  """AOT-compiles the prompt train step for `args` and returns the per-device memory report."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P

  from prompt_tuning.cli import gin_utils
  from prompt_tuning.training import optimizers
  from prompt_tuning.model import partitioning
  from prompt_tuning.formats import pretrained
  from prompt_tuning.training import step as train_lib
  from prompt_tuning.model.t5 import T5
  from prompt_tuning.training.objective import EncoderDecoderModel
  from prompt_tuning.model.prompt import PromptConfig

  data, model_parallel = parse_mesh(args.mesh)
  gin_file = gin_utils.resolve_gin_file(args.gin_file, [str(gin_utils.project_gin_dir())])
  config = gin_utils.config_from_gin(gin_file)
  if config is None:
    raise ValueError(f"{gin_file} sets no MODEL_CONFIG; give a gin file with the architecture")
  config = config.replace(dropout_rate=0.0, scan_layers=args.scan, remat_policy=args.remat,
                          matmul_dtype=args.matmul_dtype, dtype=args.dtype or config.dtype)
  if args.batch % data:
    raise ValueError(f"--batch {args.batch} is not divisible by the {data} data-parallel devices")

  module = T5(config, prompt=PromptConfig(length=args.prompt))
  model = EncoderDecoderModel(module)
  devices = jax.devices()[:data * model_parallel]
  mesh = partitioning.make_mesh(mesh_shape=(data, model_parallel), devices=devices)
  part = partitioning.Partitioner(
      mesh, partitioning.standard_logical_axis_rules(args.parameter_partitioning_dims))

  enc = jax.ShapeDtypeStruct((1, args.inputs), jnp.int32)
  dec = jax.ShapeDtypeStruct((1, args.targets), jnp.int32)
  boxed = jax.eval_shape(module.init, jax.random.PRNGKey(0), enc, dec)["params"]
  shardings = part.shardings_from_boxed(boxed)
  shapes = nn.meta.unbox(boxed)
  for path, (s, sh) in _flat(shapes, shardings):
    if not _divides(s.shape, sh):
      raise ValueError(f"{path} {tuple(s.shape)} cannot be split evenly by {sh.spec} over mesh "
                       f"{dict(mesh.shape)}: choose a model-parallel size that divides the "
                       f"number of heads ({config.num_heads}) and d_ff ({config.d_ff})")
  trainable_shapes, frozen_shapes = optimizers.split_params(shapes)
  trainable_sh, frozen_sh = optimizers.split_params(shardings)
  frozen_dtype = jnp.dtype(args.frozen_dtype)

  def abstract(shape_tree, sharding_tree, dtype=None):
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, dtype or s.dtype, sharding=sh),
                        shape_tree, sharding_tree)
  frozen = abstract(frozen_shapes, frozen_sh, frozen_dtype)
  trainable = abstract(trainable_shapes, trainable_sh, jnp.float32)

  tx = optimizers.prompt_tuning_optimizer(0.3)
  state_shapes = jax.eval_shape(lambda t: train_lib.create_train_state(t, tx), trainable)
  # The optimizer state of a replicated prompt is replicated; the prompt keeps its own sharding.
  state_sh = jax.tree.map(lambda _: part.replicated(), state_shapes)
  state_sh = state_sh.replace(params=trainable_sh)
  state = abstract(state_shapes, state_sh)

  batch_sh = part.batch_sharding()
  batch = {name: jax.ShapeDtypeStruct((args.batch, length), jnp.int32, sharding=batch_sh)
           for name, length in (("encoder_input_tokens", args.inputs),
                                ("decoder_input_tokens", args.targets),
                                ("decoder_target_tokens", args.targets))}
  rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=NamedSharding(mesh, P()))

  step = train_lib.jit_train_step(model, tx, num_microbatches=args.num_microbatches,
                                  in_shardings=(state_sh, frozen_sh, batch_sh, rng.sharding),
                                  out_shardings=(state_sh, part.replicated()))
  with part.activate():
    t0 = time.perf_counter()
    lowered = step.lower(state, frozen, batch, rng)
    lower_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost

  def tree_bytes(tree):
    return sum(_shard_bytes(x.shape, x.dtype, x.sharding) for x in jax.tree.leaves(tree))
  params_b = tree_bytes(frozen)
  prompt_opt_b = tree_bytes(state)
  batch_b = tree_bytes(batch) + tree_bytes(rng)
  temp_b = int(mem.temp_size_in_bytes)
  argument_b = int(mem.argument_size_in_bytes)
  total_b = argument_b + temp_b
  artefact_b = cpu_weight_copy_bytes(compiled.as_text())
  notes = []
  if artefact_b:
    notes.append(f"temporaries include {artefact_b / GIB:.2f} GiB of float32 copies that "
                 "XLA:CPU makes of bfloat16 weights (it upcasts them for its dots and hoists "
                 "the converts out of scan); GPUs and TPUs run bfloat16 natively and make "
                 "none, so 'total on accelerators' leaves them out")
  if args.remat != "none" and not args.scan:
    notes.append("remat without --scan: XLA:CPU drops the rematerialisation barriers, so the "
                 "temporaries shown are those of no remat")
  if args.scan:
    notes.append("FLOPs of a scanned model count one layer per stack (cost_analysis)")
  return {
      "gin_file": args.gin_file, "mesh": {"data": data, "model": model_parallel},
      "batch": args.batch, "inputs": args.inputs, "targets": args.targets,
      "prompt": args.prompt, "scan": args.scan, "remat": args.remat, "dtype": config.dtype,
      "matmul_dtype": config.matmul_dtype, "frozen_dtype": frozen_dtype.name,
      "parameter_partitioning_dims": args.parameter_partitioning_dims,
      "num_parameters": sum(int(x.size) for x in jax.tree.leaves(shapes)),
      "per_device_bytes": {"parameters": params_b, "prompt_and_optimizer": prompt_opt_b,
                           "batch": batch_b, "arguments": argument_b, "temporaries": temp_b,
                           "output": int(mem.output_size_in_bytes),
                           "alias": int(mem.alias_size_in_bytes), "total": total_b,
                           "cpu_weight_copies": artefact_b,
                           "total_on_accelerators": total_b - artefact_b},
      "fits": total_b - artefact_b <= args.device_gib * GIB, "fits_as_compiled_for_cpu":
      total_b <= args.device_gib * GIB, "device_gib": args.device_gib,
      "flops_per_device": float(cost.get("flops", 0.0)),
      "lower_s": round(lower_s, 2), "compile_s": round(compile_s, 2), "notes": notes,
  }


def format_table(report: dict) -> str:
  b = report["per_device_bytes"]
  mesh = report["mesh"]
  opts = [f"scan={report['scan']}", f"remat={report['remat']}", f"dtype={report['dtype']}",
          f"matmul_dtype={report['matmul_dtype']}", f"frozen={report['frozen_dtype']}"]
  lines = [
      f"{report['gin_file']}: {report['num_parameters'] / 1e9:.2f}B parameters, mesh "
      f"data={mesh['data']} x model={mesh['model']}, batch {report['batch']}, inputs "
      f"{report['inputs']} + prompt {report['prompt']}, targets {report['targets']}",
      "  " + ", ".join(opts),
      f"  lowered in {report['lower_s']:.1f}s, compiled in {report['compile_s']:.1f}s",
      "  per device:",
  ]
  for key, label in (("parameters", "parameters (frozen)"), ("prompt_and_optimizer",
                     "prompt + optimizer"), ("batch", "batch"), ("temporaries", "temporaries"),
                     ("total", "total (arguments + temporaries)")):
    lines.append(f"    {label:34s} {b[key] / GIB:8.2f} GiB")
  if b["cpu_weight_copies"]:
    for key, label in (("cpu_weight_copies", "of which XLA:CPU weight copies"),
                       ("total_on_accelerators", "total on accelerators")):
      lines.append(f"    {label:34s} {b[key] / GIB:8.2f} GiB")
  verdict = "fits" if report["fits"] else "does NOT fit"
  lines.append(f"  {verdict} in {report['device_gib']:g} GiB per device")
  lines += [f"  note: {n}" for n in report["notes"]]
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = _parser().parse_args(argv)
  data, model_parallel = parse_mesh(args.mesh)
  _ensure_devices(data * model_parallel, argv)
  report = plan(args)
  print(json.dumps(report) if args.json else format_table(report), flush=True)
  return report


if __name__ == "__main__":
  main()
