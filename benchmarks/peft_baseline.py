"""The same measurements as `train_step.py`, for HF transformers + PEFT prompt tuning on torch CPU.

  python benchmarks/peft_baseline.py --batch 8 --inputs 128 --targets 32 --prompt 100 --dtype f32 --json
  python benchmarks/peft_baseline.py --batch 8 --inputs 128 --targets 32 --prompt 100 --dtype bf16 --json

Same shapes, random weights, batch and seed as ours. `--dtype bf16` runs under
`torch.autocast("cpu", dtype=torch.bfloat16)` (float32 weights, bf16 matmuls), PEFT's usual mixed
precision. The prompt is prepended to the encoder only (`num_transformer_submodules=1`), as in the
paper and in our model; Adafactor with the paper's settings for the prompt, HF's default
(factored) Adafactor for full fine-tuning. The JSON keys are ours; FLOP counts are not available
from torch and are left out.
"""
from __future__ import annotations

import contextlib
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import time  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402
import peft  # noqa: E402
from transformers.optimization import Adafactor  # noqa: E402

from benchmarks import common  # noqa: E402


def build_model(args) -> transformers.T5ForConditionalGeneration:
  s = common.SIZES[args.size]
  config = transformers.T5Config(
      vocab_size=s["vocab_size"], d_model=s["d_model"], d_kv=s["d_kv"], d_ff=s["d_ff"],
      num_heads=s["num_heads"], num_layers=s["num_layers"], num_decoder_layers=s["num_layers"],
      feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
  torch.manual_seed(0)
  return transformers.T5ForConditionalGeneration(config)


def main(argv=None) -> dict:
  args = common.parse(common.parser(__doc__.splitlines()[0]), argv)
  torch.set_grad_enabled(True)
  base = build_model(args)
  batch = {k: torch.from_numpy(v).long()
           for k, v in common.random_batch(args, base.config.vocab_size).items()}
  enc, labels = batch["encoder_input_tokens"], batch["decoder_target_tokens"]
  mask = torch.ones_like(enc)
  timing = dict(steps=args.steps, warmup=args.warmup)
  autocast = ((lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if args.dtype == "bf16"
              else contextlib.nullcontext)
  common.log(args, f"torch {torch.__version__} threads {torch.get_num_threads()} "
                   f"dtype {args.dtype}")

  # Full fine-tuning first (on the plain model: get_peft_model freezes the base weights).
  base.train()
  ft_opt = Adafactor(base.parameters(), lr=1e-3, relative_step=False, scale_parameter=False,
                     warmup_init=False)

  def make_step(model, opt):
    def step():
      with autocast():
        loss = model(input_ids=enc, attention_mask=mask, labels=labels).loss
      loss.backward()
      opt.step()
      opt.zero_grad(set_to_none=True)
      return loss
    return step

  full_step = make_step(base, ft_opt)
  full_ms = common.median_ms(full_step, **timing) if "full" in args.only else None
  common.log(args, f"full fine-tuning step {full_ms} ms")
  del ft_opt

  config = peft.PromptTuningConfig(task_type=peft.TaskType.SEQ_2_SEQ_LM,
                                   num_virtual_tokens=args.prompt, num_transformer_submodules=1)
  model = peft.get_peft_model(base, config)
  trainable = [p for p in model.parameters() if p.requires_grad]
  assert sum(p.numel() for p in trainable) == args.prompt * base.config.d_model
  opt = Adafactor(trainable, lr=0.3, relative_step=False, scale_parameter=False,
                  warmup_init=False, decay_rate=-0.8, weight_decay=1e-5)

  prompt_step = make_step(model, opt)
  t0 = time.perf_counter()
  prompt_step()
  first_step_s = time.perf_counter() - t0
  prompt_ms = common.median_ms(prompt_step, **timing) if "prompt" in args.only else None
  common.log(args, f"prompt step {prompt_ms} ms")

  model.eval()

  def forward():
    with torch.no_grad(), autocast():
      return model(input_ids=enc, attention_mask=mask, labels=labels).loss
  eval_ms = common.median_ms(forward, **timing) if "eval" in args.only else None
  common.log(args, f"eval forward {eval_ms} ms")

  def generate():
    with torch.no_grad(), autocast():
      out = model.generate(input_ids=enc, attention_mask=mask, max_new_tokens=args.decode,
                           min_new_tokens=args.decode, do_sample=False, num_beams=1)
    # The decoder start token plus exactly `decode` new tokens.
    assert out.shape == (args.batch, args.decode + 1), out.shape
    return out
  greedy_ms = common.median_ms(generate, **timing) if "greedy" in args.only else None
  common.log(args, f"generate {args.decode} tokens {greedy_ms} ms")

  tokens = args.batch * (args.inputs + args.prompt + args.targets)
  r2 = lambda x: None if x is None else round(x, 2)
  result = {
      "prompt_step_ms": r2(prompt_ms),
      "full_ft_step_ms": r2(full_ms),
      "eval_fwd_ms": r2(eval_ms),
      "greedy32_ms": r2(greedy_ms),
      "compile_s": round(first_step_s, 2),  # eager: the first step's time
      "flops_prompt_step": None,
      "flops_full_step": None,
      "gflops_per_s": None,
      "peak_rss_mb": round(common.peak_rss_mb(), 1),
      "tokens_per_s": None if prompt_ms is None else round(tokens / (prompt_ms / 1e3), 1),
      "framework": f"torch {torch.__version__} + peft {peft.__version__}",
      "dtype": args.dtype, "size": args.size, "batch": args.batch, "inputs": args.inputs,
      "targets": args.targets, "prompt": args.prompt, "decode_tokens": args.decode,
      "steps": args.steps, "threads": torch.get_num_threads(),
  }
  common.emit(result)
  return result


if __name__ == "__main__":
  main()
