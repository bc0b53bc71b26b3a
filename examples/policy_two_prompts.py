"""Show that the adaptive policy decides differently for an easy and a hard prompt.

Run: .venv/bin/python examples/policy_two_prompts.py [--model smollm2-135m] [--layers 8]

For each prompt it runs one patched prefill and prints, per patched layer, the policy's sigma,
gamma and rank (mean over the batch, which is one sequence here), then a summary of how often and
how much the two prompts' decisions differ.
"""

from __future__ import annotations

import argparse

import torch

import vps
from vps.prompting import chat_prompt

PROMPTS = {
    "easy": "What is 2 + 2?",
    "hard": ("A train leaves at 3:15 pm travelling 84 km/h; a second train leaves the same station at 4:05 pm "
             "at 112 km/h on the same track. At what time does the second train catch up, and how far from "
             "the station are they?"),
}


def decisions(model, tok, question: str) -> dict[str, dict[str, float]]:
    enc = tok([chat_prompt(tok, question)], return_tensors="pt")
    with torch.no_grad():
        model(**enc)
    keys = ("sigma", "gamma", "rank", "energy")
    return {name: {k: row[k][0] for k in keys} for name, row in vps.trace(model).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--layers", type=int, default=8, help="how many layers to print (all are compared)")
    args = parser.parse_args()
    model, tok = vps.load_model(args.model)
    vps.patch(model, vps.VPSConfig())
    result = {label: decisions(model, tok, q) for label, q in PROMPTS.items()}
    names = list(result["easy"])
    step = max(1, len(names) // args.layers)
    print(f"{'layer':<40} {'sigma easy':>10} {'sigma hard':>10} {'gamma easy':>10} {'gamma hard':>10} "
          f"{'rank e':>6} {'rank h':>6}")
    for name in names[::step]:
        e, h = result["easy"][name], result["hard"][name]
        print(f"{name:<40} {e['sigma']:>10.4f} {h['sigma']:>10.4f} {e['gamma']:>10.4f} {h['gamma']:>10.4f} "
              f"{e['rank']:>6} {h['rank']:>6}")
    diff_sigma = [abs(result["easy"][n]["sigma"] - result["hard"][n]["sigma"]) for n in names]
    diff_rank = sum(result["easy"][n]["rank"] != result["hard"][n]["rank"] for n in names)
    mean = {lab: sum(r[n]["sigma"] for n in names) / len(names) for lab, r in result.items()}
    print(f"\n{len(names)} layers: sigma differs in {sum(d > 1e-6 for d in diff_sigma)} "
          f"(max |diff| {max(diff_sigma):.4f}); rank differs in {diff_rank}; "
          f"mean sigma easy {mean['easy']:.4f} vs hard {mean['hard']:.4f}")


if __name__ == "__main__":
    main()
