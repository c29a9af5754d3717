"""One APPO step with scripted generation; writes every rank's per-token advantages keyed by (prompt, root).

Launched by tests/test_distributed.py twice on the same data: `accelerate launch --cpu --num_processes 2` and a
single process with twice the per-device batch, so both see the same global generation batch.
"""

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(out_path: str, per_device: int) -> None:
    import torch
    from datasets import Dataset

    from trl_appo.config import APPOConfig
    from trl_appo.testing import build_tiny_model, build_tiny_tokenizer, conversational_prompts, encode
    from trl_appo.trainer import APPOTrainer

    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok, seed=0)
    questions = [f"What is {i} + {i + 3}?" for i in range(8)]

    def scripted(contexts, images, multimodal_fields, num_generations, has_tool_images=False):
        # Deterministic continuation from the context alone, so 1 and 2 processes generate the same tokens.
        outs = []
        for ctx in contexts:
            h = sum((i + 1) * t for i, t in enumerate(ctx)) % 997
            outs.append(encode(tok, f" step {h % 13} then {h % 7} and {h % 5} done") + [tok.eos_token_id])
        return outs, None

    def reward(completions, **kw):
        return [float(len(c[-1]["content"]) % 6) for c in completions]

    args = APPOConfig(
        output_dir=os.path.dirname(out_path), bf16=False, use_cpu=True, report_to="none", save_strategy="no",
        per_device_train_batch_size=per_device, num_generations=4, num_branches=1, max_completion_length=24,
        min_branch_tokens=2, max_steps=1, branch_schedule="per_generation", branch_criterion="entropy",
        learning_rate=1e-3, seed=7, shuffle_dataset=False,
    )
    ds = Dataset.from_dict({"prompt": conversational_prompts(questions)})
    trainer = APPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=ds, processing_class=tok)
    trainer._generate_single_turn = scripted
    captured = []
    orig = trainer._generate_and_score_completions

    def capture(inputs):
        out = orig(inputs)
        captured.append((inputs, out))
        return out

    trainer._generate_and_score_completions = capture
    trainer.train()
    rows = {}
    N = args.num_roots
    for inputs, out in captured:
        roots = [row for j, row in enumerate(inputs) if j % args.num_generations < N]
        for i, row in enumerate(roots):
            key = f"{row['prompt'][-1]['content']}#{i % N}"
            mask = out["completion_mask"][i].bool()
            rows[key] = out["advantages"][i][mask].tolist()
    rank = trainer.accelerator.process_index
    with open(f"{out_path}.rank{rank}.json", "w") as f:
        json.dump(rows, f)
    assert torch.isfinite(torch.tensor([v for vals in rows.values() for v in vals])).all()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
