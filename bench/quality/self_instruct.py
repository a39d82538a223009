"""Self-Instruct with SmolLM2-135M-Instruct as the generator, from the Self-Instruct seed tasks.

Runs the service's own loop (``service.datagen.loop.SelfInstruct``, the code a data-generation
job runs) on an in-process chat engine (no Ray, no API: the machine's two cores go to the model),
writes the examples as they come (``--out``, JSONL in OpenAI's chat format; rewritten after every
round, so a run stopped early leaves what it had), and then reports, as the paper's analysis
does (Wang et al., 2023, §3):

- how many candidates each filter removed;
- diversity: distinct root verbs of the kept instructions. No dependency parser is installed
  here, so the "root verb" is a stated heuristic: the first word of the instruction, or, for an
  instruction opening with a subordinate phrase ("Given …, find …", "If …, …"), the first word
  after its first comma; lower-cased, counted if it is not a determiner or pronoun;
- the distribution of each kept instruction's highest ROUGE-L with any seed instruction.

``--sft`` then trains a short LoRA SFT job on the result through ``tuneserve train`` (the same
training run a job makes) and records its final loss.

Usage: ``python bench/quality/self_instruct.py --count 1000 --out /tmp/si.jsonl [--sft]``;
results to ``bench/results/self_instruct.{json,md}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from service.core.names import BUILTIN_MODEL_ID
from service.core.settings import Settings
from service.datagen import seeds as seed_files
from service.datagen.filters import FilterSettings, Pool
from service.datagen.loop import LoopSettings, Sampling, SelfInstruct, Target

SEEDS = REPO.parent / "shared" / "data" / "real" / "self_instruct_seed_tasks.tail.jsonl"
RESULTS = REPO / "bench" / "results"
NOT_VERBS = {"a", "an", "the", "this", "these", "that", "you", "your", "i", "we", "it", "in",
             "for", "on", "with", "here", "there", "what", "how", "which", "who", "why", "is",
             "are", "can", "do", "does"}


def root_verb(instruction: str) -> str | None:
    text = instruction.strip()
    first = text.split(maxsplit=1)[0].lower().strip(".,:;!?\"'*") if text else ""
    if first in ("given", "if", "when", "for", "based", "using", "in", "after") and "," in text:
        rest = text.split(",", 1)[1].split()
        first = rest[0].lower().strip(".,:;!?\"'*") if rest else ""
    return first if first.isalpha() and first not in NOT_VERBS else None


def analyse(kept: list[dict], seed_texts: list[str]) -> dict:
    verbs = Counter(v for k in kept if (v := root_verb(k["instruction"])))
    seeds_pool = Pool(seed_texts, threshold=1.01)  # never stops early: the exact maximum
    overlaps = [seeds_pool.max_rouge_l(k["instruction"]) for k in kept]
    bins = Counter(min(int(o * 10), 9) for o in overlaps)
    return {
        "distinct_root_verbs": len(verbs),
        "instructions_with_a_root_verb": sum(verbs.values()),
        "top_root_verbs": verbs.most_common(20),
        "rouge_l_vs_seeds": {
            "mean": round(statistics.fmean(overlaps), 3) if overlaps else None,
            "median": round(statistics.median(overlaps), 3) if overlaps else None,
            "histogram": {f"{b / 10:.1f}-{(b + 1) / 10:.1f}": bins[b] for b in range(10)}},
        "classification_share": round(sum(k["is_classification"] for k in kept)
                                      / max(len(kept), 1), 3),
        "mean_instruction_words": round(statistics.fmean(
            len(k["instruction"].split()) for k in kept), 1) if kept else None,
    }


async def generate(args) -> dict:
    from service.chat.backends import LocalChatBackend

    data = SEEDS.read_bytes()
    tasks, sha = seed_files.load(data)
    settings = Settings(builtin_models=True)
    chat = LocalChatBackend(settings, max_batch=args.batch)
    loop = SelfInstruct(chat, Target(BUILTIN_MODEL_ID), tasks, LoopSettings(
        count=args.count, sampling=Sampling(seed=args.seed, max_tokens=args.max_tokens,
                                            instance_max_tokens=args.max_tokens),
        filters=FilterSettings(), prompts_per_round=args.prompts_per_round,
        max_instances_per_task=args.instances),
        concurrency=2 * args.batch)
    out = Path(args.out)
    log = out.with_suffix(".progress.jsonl")
    log.write_text("")

    async def report(progress) -> None:
        with out.open("w") as f:
            f.writelines(json.dumps(e, ensure_ascii=False) + "\n"
                         for e in loop.examples[:args.count])
        with out.with_suffix(".kept.json").open("w") as f:
            json.dump(loop.kept, f, ensure_ascii=False)
        with log.open("a") as f:
            f.write(json.dumps(progress.data()) + "\n")
        print(json.dumps(progress.data()), flush=True)

    started = time.monotonic()
    result = await loop.run(report)
    seconds = time.monotonic() - started
    return {"seed_file": str(SEEDS.name), "seed_sha256": sha, "seed_tasks": len(tasks),
            "generator": BUILTIN_MODEL_ID, "examples": len(result.examples),
            "instructions": len(result.instructions), "rounds": result.rounds,
            "stopped": result.stopped, "candidates": result.tally.candidates,
            "removed": result.tally.counts(), "seconds": round(seconds, 1),
            "examples_per_minute": round(60 * len(result.examples) / seconds, 2),
            "settings": {"count": args.count, "prompts_per_round": args.prompts_per_round,
                         "max_tokens": args.max_tokens, "seed": args.seed,
                         "max_instances_per_task": args.instances,
                         "engine_batch": args.batch},
            **analyse(result.instructions, [t.instruction for t in tasks])}


def sft(path: Path, work: Path) -> dict:
    """A short LoRA SFT run (one epoch) on the generated file, through ``tuneserve train``
    (the training run a job makes, without the API)."""
    from service.core.storage import open_storage
    from service.core.storage.config import StorageConfig

    job_id, file_id = "ftjob-" + "5" * 24, "file-" + "5" * 24
    storage_dir = work / "store"
    storage = open_storage(StorageConfig(uri=str(storage_dir)))
    storage.put(f"files/{file_id}/content", path.read_bytes())
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps({
        "job_id": job_id, "base_model": BUILTIN_MODEL_ID, "training_files": [[file_id, 1.0]],
        "n_epochs": 1, "batch_size": 8, "max_length": 512, "checkpoint_every_steps": 0,
        "storage": str(storage_dir)}))
    started = time.monotonic()
    proc = subprocess.run([str(REPO / ".venv" / "bin" / "tuneserve"), "train", str(spec_path)],
                          capture_output=True, text=True, cwd=REPO)
    out = proc.stdout
    metrics = json.loads(out[out.index("{"):]) if proc.returncode == 0 and "{" in out else None
    return {"returncode": proc.returncode, "seconds": round(time.monotonic() - started, 1),
            "adapter_written": storage.exists(f"adapters/{job_id}/final/manifest.json"),
            "metrics": metrics, "log_tail": None if metrics else (out + proc.stderr)[-2000:]}


def write_results(summary: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "self_instruct.json").write_text(json.dumps(summary, indent=1) + "\n")
    rows = "\n".join(f"| {k} | {v} |" for k, v in (summary.get("removed") or {}).items())
    hist = summary["rouge_l_vs_seeds"]["histogram"]
    sft_run = summary.get("sft") or {}
    metrics = sft_run.get("metrics") or {}
    lines = [
        "# Self-Instruct with SmolLM2-135M-Instruct",
        "",
        f"`{summary.get('command', 'python bench/quality/self_instruct.py')}`; CPU "
        f"{summary.get('cpu')}, load average {summary.get('load_average')}"
        + (f"; {summary['beside']}" if summary.get("beside") else "") + ".",
        "",
        f"- seed tasks: {summary.get('seed_tasks')} ({summary.get('seed_file')}, sha256 "
        f"{str(summary.get('seed_sha256'))[:12]}…)",
        f"- kept: **{summary['examples']} examples** from {summary['instructions']} instructions "
        f"in {summary.get('rounds')} rounds, {summary.get('seconds')} s "
        f"({summary.get('examples_per_minute')} examples/minute); stopped: "
        f"{summary.get('stopped')}",
        f"- candidate instructions: {summary.get('candidates')}",
        f"- distinct root verbs: {summary['distinct_root_verbs']} (of "
        f"{summary['instructions_with_a_root_verb']} instructions with one; method in the "
        "script's docstring); top: " + ", ".join(f"{v} {n}" for v, n in
                                                 summary["top_root_verbs"][:10]),
        f"- ROUGE-L with the most similar seed: mean {summary['rouge_l_vs_seeds']['mean']}, "
        f"median {summary['rouge_l_vs_seeds']['median']}",
        f"- classification share: {summary['classification_share']}; mean instruction length "
        f"{summary['mean_instruction_words']} words",
        "",
        "| filter | candidates removed |", "|---|---|", rows, "",
        "| ROUGE-L vs seeds | instructions |", "|---|---|",
        *(f"| {k} | {v} |" for k, v in hist.items()), "",
    ]
    if sft_run:
        lines += [f"SFT on the file (`tuneserve train`, one epoch, LoRA, batch 8): return code "
                  f"{sft_run['returncode']}, adapter written: {sft_run.get('adapter_written')}, "
                  f"{sft_run['seconds']} s; final metrics: "
                  + json.dumps({k: metrics.get(k) for k in ("train_loss", "total_steps")
                                if k in metrics}), ""]
    (RESULTS / "self_instruct.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--out", default="/tmp/self_instruct.jsonl")
    parser.add_argument("--prompts-per-round", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=192)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--instances", type=int, default=2,
                        help="examples one kept instruction gives at most")
    parser.add_argument("--analyse-only", action="store_true",
                        help="report on --out's .kept.json (a run stopped early)")
    parser.add_argument("--beside", help="what else ran on the machine (for the results)")
    parser.add_argument("--sft", action="store_true",
                        help="then a one-epoch LoRA SFT run on --out (tuneserve train)")
    args = parser.parse_args()
    from training.cpu.info import cpu_description

    if args.analyse_only:
        kept = json.loads(Path(args.out).with_suffix(".kept.json").read_text())
        tasks, _ = seed_files.load(SEEDS.read_bytes())
        previous = json.loads((RESULTS / "self_instruct.json").read_text()) \
            if (RESULTS / "self_instruct.json").exists() else {}
        progress = [json.loads(line) for line in Path(args.out).with_suffix(
            ".progress.jsonl").read_text().splitlines()]
        last = progress[-1] if progress else {}
        examples = sum(1 for _ in Path(args.out).open())
        summary = {**{k: previous.get(k) for k in ("seed_file", "seed_sha256", "seed_tasks",
                                                  "generator")},
                   "stopped": "by hand (time), before the count", "examples": examples,
                   "instructions": len(kept), "rounds": last.get("round"),
                   "candidates": last.get("candidates"), "removed": last.get("removed"),
                   "seconds": last.get("seconds"),
                   "examples_per_minute": round(60 * examples / last["seconds"], 2)
                   if last else None,
                   "settings": {"count": args.count, "prompts_per_round": args.prompts_per_round,
                                "max_tokens": args.max_tokens, "seed": args.seed,
                                "max_instances_per_task": args.instances,
                                "engine_batch": args.batch},
                   "progress": progress,
                   **analyse(kept, [t.instruction for t in tasks])}
    else:
        summary = asyncio.run(generate(args))
    if args.sft:
        import tempfile

        with tempfile.TemporaryDirectory() as work:
            summary["sft"] = sft(Path(args.out), Path(work))
    summary["cpu"] = cpu_description()
    summary["command"] = "python bench/quality/self_instruct.py " + " ".join(sys.argv[1:])
    summary["load_average"] = os.getloadavg()
    summary["beside"] = args.beside
    print(json.dumps(summary, indent=1))
    write_results(summary)


if __name__ == "__main__":
    main()
