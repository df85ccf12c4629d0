"""The torch side of the benchmarks: Hugging Face LlamaForCausalLM / MixtralForCausalLM train steps
at the BENCH.md sizes, and torch's matmul PEAK, measured by a Python 3.11 venv with the CPU torch
wheel (the main venv has none).

  .venv/bin/python bench/peers.py            # builds .venv-hf if missing, prints torch's figures as JSON
  from peers import torch_figures            # what bench/train_step.py and bench/moe_layer.py call

``torch_figures()`` returns None (and the benches say so) when the venv cannot be built. The
worker (``--worker``, run inside the venv) times one full train step (forward with labels,
backward, AdamW) per model, median of `repeats` after 2 warm-up steps, float32, 2048 tokens.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = os.path.join(REPO, ".venv-hf")
SIZES = dict(vocab_size=8192, hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8,
             head_dim=64, max_position_embeddings=512, tie_word_embeddings=False)
MODELS = {  # name -> (architecture, extra config)
    "DENSE_BENCH": ("llama", {"intermediate_size": 1536}),
    "DENSE_EQUIV": ("llama", {"intermediate_size": 3072}),
    "MOE_BENCH": ("mixtral", {"intermediate_size": 1536, "num_local_experts": 8, "num_experts_per_tok": 2}),
}


def ensure_venv(out=print) -> str | None:
    python = os.path.join(VENV, "bin", "python")
    if os.path.exists(python):
        return python
    out(f"[peers] building {VENV} (Python 3.11 + torch 2.13.0 CPU + transformers) ...")
    result = subprocess.run(["bash", os.path.join(REPO, "scripts", "make_hf_venv.sh"), VENV], capture_output=True,
                            text=True)
    if result.returncode:
        out(f"[peers] no torch venv ({result.stderr.strip().splitlines()[-1] if result.stderr.strip() else 'failed'})")
        return None
    return python


def torch_figures(models=tuple(MODELS), repeats: int = 5, experts: tuple[int, ...] = (), out=print) -> dict | None:
    """{"PEAK": FLOP/s, "<model>": seconds per train step, "MOE_E<e>": ...} from the torch venv, or None."""
    python = ensure_venv(out)
    if python is None:
        return None
    cmd = [python, os.path.abspath(__file__), "--worker", "--models", ",".join(models), "--repeats", str(repeats)]
    if experts:
        cmd += ["--experts", ",".join(map(str, experts))]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode:
        out(f"[peers] the torch worker failed:\n{result.stderr[-2000:]}")
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])


def _worker(models: list[str], repeats: int, experts: list[int]) -> dict:
    import torch
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

    from timing import best_time  # bench/ is sys.path[0]: this file runs as a script

    torch.manual_seed(0)

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    peak = 2 * 2048 ** 3 / min(best_time(lambda: torch.mm(a, b), repeats) for _ in range(3))

    def step_time(kind: str, extra: dict) -> float:
        if kind == "llama":
            model = LlamaForCausalLM(LlamaConfig(**SIZES, **extra))
        else:
            config = MixtralConfig(**SIZES, **extra, router_aux_loss_coef=0.01, output_router_logits=True)
            config._experts_implementation = "grouped_mm"
            model = MixtralForCausalLM(config)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        ids = torch.randint(3, SIZES["vocab_size"], (4, 512))

        def step():
            opt.zero_grad(set_to_none=True)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()

        return best_time(step, repeats)

    figures = {"PEAK": peak, "torch": torch.__version__, "transformers": transformers.__version__,
               "threads": torch.get_num_threads()}
    for name in models:
        kind, extra = MODELS[name]
        figures[name] = step_time(kind, extra)
    for e in experts:
        figures[f"MOE_E{e}"] = step_time("mixtral", {**MODELS["MOE_BENCH"][1], "num_local_experts": e})
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", action="store_true", help="(inside the torch venv) time and print JSON")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--experts", default="", help="also MOE_BENCH with these expert counts, e.g. 4,32")
    args = parser.parse_args()
    models = [m for m in args.models.split(",") if m]
    experts = [int(e) for e in args.experts.split(",") if e]
    if args.worker:
        print(json.dumps(_worker(models, args.repeats, experts)))
    else:
        print(json.dumps(torch_figures(tuple(models), args.repeats, tuple(experts)), indent=1))


if __name__ == "__main__":
    main()
