"""GPU check (issue 4): 5 APPO steps per backend on a small model built offline; step time and peak GPU memory.

Run on a GPU machine:  python benchmarks/gpu_check.py --out results.json
Backends: the transformers backend always; vLLM colocate when `vllm` is importable (skipped with a reason
otherwise). GRPO (criterion 'none') runs in the same process as the baseline, so times are comparable.
`--device cpu --small` is a smoke mode for machines without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def run(criterion: str, backend: str, args, tokenizer, model_dir: str) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from trl_appo.config import APPOConfig
    from trl_appo.testing import conversational_prompts
    from trl_appo.trainer import APPOTrainer

    gpu = args.device == "cuda"
    extra = {} if criterion in ("none", "grpo") else dict(num_branches=1)
    cfg = APPOConfig(
        output_dir=tempfile.mkdtemp(),
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        bf16=gpu and args.dtype == "bfloat16",
        use_cpu=not gpu,
        per_device_train_batch_size=8,
        num_generations=8,
        steps_per_generation=2,
        gradient_accumulation_steps=1,
        max_completion_length=args.max_completion_length,
        min_branch_tokens=8,
        max_steps=args.steps,
        learning_rate=1e-5,
        branch_criterion="none" if criterion == "grpo" else criterion,
        branch_schedule="per_update",
        use_vllm=backend == "vllm",
        vllm_mode="colocate",
        vllm_gpu_memory_utilization=0.3,
        model_init_kwargs={"dtype": args.dtype} if gpu else None,
        seed=0,
        **extra,
    )
    ds = Dataset.from_dict({"prompt": conversational_prompts([f"What is {i} + {2 * i}?" for i in range(64)])})

    def reward(completions, **kw):
        return [float(len(str(c[-1]["content"])) % 7) / 6 for c in completions]

    model = model_dir if backend == "vllm" else AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=getattr(torch, args.dtype) if gpu else torch.float32
    )
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    if criterion == "grpo":  # TRL's own trainer, same settings: separates environment issues from ours
        from trl import GRPOConfig, GRPOTrainer

        keep = {f for f in GRPOConfig.__dataclass_fields__}
        grpo_cfg = GRPOConfig(**{k: v for k, v in cfg.to_dict().items() if k in keep and k not in (
            "steps_per_generation", "generation_batch_size", "per_device_eval_batch_size")},
            steps_per_generation=2)
        trainer = GRPOTrainer(model=model, reward_funcs=reward, args=grpo_cfg, train_dataset=ds,
                              processing_class=tokenizer)
    else:
        trainer = APPOTrainer(model=model, reward_funcs=reward, args=cfg, train_dataset=ds,
                              processing_class=tokenizer)
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    steps = [e["step_time"] for e in trainer.state.log_history if "step_time" in e]
    out = {
        "criterion": criterion,
        "backend": backend,
        "steps": len(steps),
        "step_time_s": steps,
        "mean_step_time_s_excl_first": sum(steps[1:]) / max(len(steps) - 1, 1),
        "wall_s": wall,
        "peak_gpu_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if gpu else None,
        "branch_decoded_tokens": [e.get("appo/branch_decoded_tokens") for e in trainer.state.log_history
                                  if "appo/branch_decoded_tokens" in e],
        "omega_degenerate_frac": [e.get("appo/omega_degenerate_frac") for e in trainer.state.log_history
                                  if "appo/omega_degenerate_frac" in e],
    }
    del trainer, model
    if gpu:
        torch.cuda.empty_cache()
    return out


def _tolerate_unhashable_fingerprints() -> None:
    """Some device images pair a newer pyarrow with a dill that cannot pickle its types; `datasets` then fails
    while fingerprinting. Fingerprints only name cache files, so fall back to a random one (this script only)."""
    import datasets.fingerprint as fp

    orig_hash, orig_update = fp.Hasher.hash.__func__, fp.Hasher.update

    def _hash(cls, value):
        try:
            return orig_hash(cls, value)
        except Exception:
            return fp.generate_random_fingerprint()

    def _update(self, value):
        try:
            return orig_update(self, value)
        except Exception:
            return orig_update(self, fp.generate_random_fingerprint())

    fp.Hasher.hash = classmethod(_hash)
    fp.Hasher.update = _update


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--small", action="store_true", help="tiny model (smoke mode)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--max_completion_length", type=int, default=256)
    p.add_argument("--out", default="gpu_check.json")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--control", action="store_true", help="also run TRL's own GRPOTrainer first (same settings)")
    args = p.parse_args()

    import torch

    from trl_appo.testing import build_tiny_model, build_tiny_tokenizer, save_tiny_pair

    _tolerate_unhashable_fingerprints()

    tok = build_tiny_tokenizer()
    size = dict(hidden_size=32, num_layers=2, intermediate_size=64) if args.small else dict(
        hidden_size=1024, num_layers=16, num_heads=16, num_kv_heads=4, intermediate_size=2816,
        max_position_embeddings=4096)
    model = build_tiny_model(tok, **size)
    n_params = sum(p.numel() for p in model.parameters())
    model_dir = save_tiny_pair(model, tok, tempfile.mkdtemp())
    info = {"device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
            "torch": torch.__version__, "params": n_params, "results": [], "skipped": []}
    print(json.dumps({k: v for k, v in info.items() if k != "results"}), flush=True)
    try:
        import vllm  # noqa: F401

        backends = ["transformers", "vllm"]
    except ImportError:
        backends = ["transformers"]
        info["skipped"].append("vllm colocate: vllm is not installed on this machine")
    if args.control:
        try:
            r = run("grpo", "transformers", args, tok, model_dir)
            info["results"].append(r)
            print(json.dumps(r), flush=True)
        except Exception as e:
            import traceback

            traceback.print_exc()
            info["skipped"].append(f"TRL GRPOTrainer control: {type(e).__name__}: {e}")
    for backend in backends:
        for criterion in ("none", "bs"):
            try:
                r = run(criterion, backend, args, tok, model_dir)
                info["results"].append(r)
                print(json.dumps(r), flush=True)
            except Exception as e:  # report and continue with the next configuration
                import traceback

                traceback.print_exc()
                info["skipped"].append(f"{backend}/{criterion}: {type(e).__name__}: {e}")
    Path(args.out).write_text(json.dumps(info, indent=2))
    print("\n| backend | criterion | mean step s (excl. first) | peak GPU GiB |")
    print("|---|---|---|---|")
    for r in info["results"]:
        mem = "-" if r["peak_gpu_mem_gib"] is None else f"{r['peak_gpu_mem_gib']:.2f}"
        print(f"| {r['backend']} | {r['criterion']} | {r['mean_step_time_s_excl_first']:.2f} | {mem} |")
    for s in info["skipped"]:
        print("SKIPPED:", s)


if __name__ == "__main__":
    main()
