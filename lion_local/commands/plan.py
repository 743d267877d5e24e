"""The model calls and tokens of a whole run, per stage and role, before and during the run.

    lion-local plan --config X [--json] [--seeds N] [--generator-acceptance A]

The model (N0 seeds, G = generation.new_per_iteration, K = iterations; the stage modules' rules):
- Pools: Train_1 = Cache_1 = the seeds; Train_k = the instructions generated in k-1 and
  Cache_k = Cache_{k-1} + Train_k; the final imitation trains on those generated in K.
- teacher: each distinct instruction once per run (the run-wide cache): imitation k asks for the
  Train Pool instructions not answered before, discrimination for the Cache Pool ones not
  answered before (none: the Train Pool is a subset of the Cache Pool), the final imitation for
  the last generated set.
- student: one call per Cache Pool instruction in each discrimination (signal likelihood: a
  prefill of the instruction and its teacher answer with 1 token generated; signal none: none).
- referee (signal referee only): two per Cache Pool instruction and per control pair (both orders; control pairs:
  discrimination.referee_check.control_pairs, at most one per Cache Pool instruction) x (1 + retry
  rate); the retry rate is the extra replies per review seen in finished discriminations
  (unreadable replies), else 0. Each referee row also gives its bound: every review retried
  roles.referee.parse_retries times ("calls_max"), what a referee that never writes a readable
  review costs before the stage stops.
- generator: quotas round(G x hard_ratio) and the rest (from the real label counts once the
  discrimination has judged); the waves of lion_local.stages.generation are replayed with each wave
  passing its expected share floor(size x a), where a, the share of replies passing the filters,
  the decontamination and the novelty check, is observed in finished generation stages, else
  generation.expected_acceptance (--generator-acceptance wins over both). When a is what the
  first wave was sized for, one wave fills the quota in 99% of sides, so the count rarely moves.
  Once a generation stage has finished, the replies it rejected as `contaminated` (too close to
  an evaluation question) are counted too: "generator_contaminated" in the JSON, absent before.
Tokens per call, per role (lion_local.commands.plan_tokens): the observed means of the run's journals once the role has made calls;
before that, prompts are the real role prompts (lion_local.roles) built for a sample of the seed
instructions and counted with the teacher's tokenizer when its model directory is here (the
chat template applied), else at CHARS_PER_TOKEN characters per token; the referee's prompt adds
the teacher's and the student's completion estimates, in the referee's mode; completions are the
role's max_tokens (the generator's length budget; for the referee, its mode's: a few tokens for the
two short modes), an upper bound.

A started run (state.json exists): a finished stage is counted from its journals ("actual");
the pools, labels and generated sets on disk replace the predicted ones, and the stages left are
predicted from them ("predicted", with the calls journaled so far by a stage under way).
N0 is the run's first Cache Pool once written, else --seeds, else the seed file's count (after
seed_limit), else seed_limit when the file is not here (prompt lengths then from the smoke seeds).
"""

from __future__ import annotations

import logging
import math
import os
from collections import Counter
from importlib import resources
from pathlib import Path

from lion_local.commands.plan_tokens import per_call_tokens
from lion_local.config import Config
from lion_local.run.layout import FINAL, Iteration, IterationDir, RunDir, Stage
from lion_local.run.record_types import TeacherAnswer
from lion_local.run.records import pools_from, seed_records
from lion_local.stages.teacher_answers import uncached
from lion_local.stages.lora import lora_parameter_count
from lion_local.stages.generation import SIDES, WaveSchedule, generation_quotas
from lion_local.stages.iteration_report import usage
from lion_local.stages.role_calls import REVIEW_ORDERS, ROLES, call_journals, discrimination_roles, stage_roles
from lion_local.run.seed_data import SeedDataError, load_seed_instructions
from lion_local.run.state import completed_stages, read_jsonl

logger = logging.getLogger(__name__)

SIGNAL_NOTES = {
    "referee": ": the student answers and the referee reviews each Cache Pool instruction",
    "likelihood": ": one student prefill per Cache Pool instruction (its teacher answer), no referee call",
    "none": ": no discrimination call; generation seeds drawn from the whole Cache Pool",
}


def build_plan(config: Config, seeds: int | None = None, generator_acceptance: float | None = None) -> dict:
    """The plan as a JSON-ready dict (the `--json` output; the table prints the same data)."""
    run = RunDir(config.run_dir)
    started = run.state_json.exists()
    completed = set(completed_stages(run)) if started else set()
    seed_ids, sample, seeds_source = _seeds(config, run, seeds)
    acceptance, acceptance_source = _acceptance(config, run, completed, generator_acceptance)
    retry_rate, retry_source = _retry_rate(config, run, completed)
    contaminated = _contaminated(config, run, completed)
    per_call, counting = per_call_tokens(config, run, sample)
    rows, pools = _walk(config, run, completed, seed_ids, acceptance, retry_rate, per_call)
    totals = {role: _sum([r for r in rows if r["role"] == role]) for role in ROLES}
    totals["all"] = _sum(rows)
    return {
        "run_dir": str(run.root),
        "started": started,
        "completed_stages": list(dict.fromkeys(r["stage"] for r in rows if r["source"] == "actual")),
        "seeds": len(seed_ids),
        "seeds_source": seeds_source,
        "new_per_iteration": config.generation.new_per_iteration,
        "iterations": config.iterations,
        "signal": config.discrimination.signal,
        "final_imitation": config.imitation.final_imitation,
        "student_training": student_training(config),
        "generator_acceptance": round(acceptance, 4),
        "generator_acceptance_source": acceptance_source,
        **({"generator_contaminated": contaminated} if contaminated else {}),
        "referee_retry_rate": round(retry_rate, 4),
        "referee_retry_source": retry_source,
        "token_counting": counting,
        "per_call": per_call,
        "pools": pools,
        "rows": rows,
        "totals": totals,
    }


def student_training(config: Config) -> dict:
    """Full weights or a LoRA adapter, with the adapter's trainable parameters when the student's
    config.json is here (lion_local.stages.lora counts them)."""
    lora = config.imitation.peft
    if lora is None:
        return {"mode": "full weights", "trainable_parameters": None}
    count = lora_parameter_count(str(config.server_for("student").model), lora.rank, lora.target_modules)
    return {"mode": f"LoRA rank {lora.rank} ({lora.serve})", "trainable_parameters": count}


# ----------------------------------------------------------------------------------------------
# Inputs: seeds, acceptance, retries, tokens per call
# ----------------------------------------------------------------------------------------------


def _seeds(config: Config, run: RunDir, seeds: int | None) -> tuple[list[str], list[dict], str]:
    """(seed ids, sample records for token counts, where N0 comes from)."""
    first_pool = run.iteration(1).cache_pool
    if first_pool.exists():
        records = read_jsonl(first_pool)
        return [r["id"] for r in records], records, f"the run ({first_pool})"
    path = Path(config.seed_data)
    # A path that is there but is no good seed file (a bad file, a directory, a FIFO) is an error (exit 2).
    records = seed_records(config) if os.path.lexists(path) else []
    if seeds is not None:
        count, source = seeds, "--seeds"
    elif records:
        return [r["id"] for r in records], records, f"seed_data ({path})"
    elif config.seed_limit is not None:
        count, source = config.seed_limit, f"seed_limit (the seed file {path} is not here)"
    else:
        raise SeedDataError(f"{path}: seed data file not found; pass --seeds N to plan without it")
    if not records:
        smoke = resources.files("lion_local.data").joinpath("smoke_seed.jsonl")
        records = [{"instruction": s.instruction, "input": s.input} for s in load_seed_instructions(str(smoke))]
        source += "; prompt lengths from the smoke seeds"
    return [f"seed/{i}" for i in range(count)], records, source


def _acceptance(config: Config, run: RunDir, completed: set[Stage], given: float | None) -> tuple[float, str]:
    """The share of generator replies passing every check of the decisions (accepted, or over
    quota; a contaminated reply does not pass): given, observed in finished generation stages, or the config's expectation."""
    if given is not None:
        return given, "--generator-acceptance"
    calls = passed = 0
    for k in range(1, config.iterations + 1):
        if Iteration(k).stage("generation") in completed:
            directory = run.iteration(k)
            calls += len(read_jsonl(directory.generator_calls))
            passed += len(read_jsonl(directory.generated))
            passed += sum(r["reason"] == "quota_reached" for r in read_jsonl(directory.rejected))
    if calls and passed:
        return passed / calls, f"observed ({passed} of {calls} replies passed)"
    return config.generation.expected_acceptance, "generation.expected_acceptance (--generator-acceptance A to change)"


def _contaminated(config: Config, run: RunDir, completed: set[Stage]) -> dict | None:
    """{"contaminated", "replies"} over the finished generation stages; None before one has finished."""
    replies = contaminated = finished = 0
    for k in range(1, config.iterations + 1):
        if Iteration(k).stage("generation") in completed:
            finished += 1
            replies += len(read_jsonl(run.iteration(k).generator_calls))
            contaminated += sum(r["reason"] == "contaminated" for r in read_jsonl(run.iteration(k).rejected))
    return {"contaminated": contaminated, "replies": replies} if finished else None


def _retry_rate(config: Config, run: RunDir, completed: set[Stage]) -> tuple[float, str]:
    """Extra referee replies per review (unreadable replies asked again), seen in finished discriminations."""
    reviews = replies = 0
    for k in range(1, config.iterations + 1):
        if Iteration(k).stage("discrimination") in completed:
            directory = run.iteration(k)
            controls, asked = read_jsonl(directory.controls), read_jsonl(directory.reviews)
            if asked or controls:  # signal likelihood or none: no review
                reviews += REVIEW_ORDERS * (len(read_jsonl(directory.cache_pool)) + len({r["id"] for r in controls}))
                replies += len(asked) + len(controls)
    if reviews:
        return max(0, replies - reviews) / reviews, f"observed ({replies} replies for {reviews} reviews)"
    return 0.0, "assumed (every reply readable)"


# ----------------------------------------------------------------------------------------------
# The walk through the stages
# ----------------------------------------------------------------------------------------------


def _walk(
    config: Config,
    run: RunDir,
    completed: set[Stage],
    seed_ids: list[str],
    acceptance: float,
    retry_rate: float,
    per_call: dict,
) -> tuple[list[dict], list[dict]]:
    """Rows (stage, role, calls, tokens, source) and pool sizes, stage by stage, with the stages'
    own rules (pools_from, the teacher cache's `uncached`, the generation waves); pools and
    generated sets on disk replace predicted ones. Records are bare {"id"} where predicted."""
    teacher_journal: list[TeacherAnswer] = read_jsonl(run.teacher_answers)
    rows: list[dict] = []
    pools: list[dict] = []

    def stage_rows(stage: Stage, predicted: dict[str, int], bounds: dict[str, int] | None = None) -> None:
        rows.extend(_stage_rows(run, stage, predicted, stage in completed, per_call, teacher_journal, bounds or {}))

    answered: set[str] = set()
    seeds = [{"id": seed_id} for seed_id in seed_ids]
    cache: list[dict] = []
    generated: list[dict] = []
    for iteration in (Iteration(k) for k in range(1, config.iterations + 1)):
        directory = run.at(iteration)
        on_disk = directory.train_pool.exists() and directory.cache_pool.exists()
        if on_disk:
            train, cache = read_jsonl(directory.train_pool), read_jsonl(directory.cache_pool)
        else:
            train, cache = pools_from(iteration, seeds, cache, generated)
        stage_rows(iteration.stage("imitation"), {"teacher": len(uncached(train, answered))})
        answered |= {r["id"] for r in train}
        called = discrimination_roles(config.discrimination.signal)  # likelihood: one student prefill each
        reviews = REVIEW_ORDERS * (len(cache) + min(config.discrimination.referee_check.control_pairs, len(cache)))
        reviews = reviews if "referee" in called else 0
        referee = round(reviews * (1 + retry_rate))
        teacher = len(uncached(cache, answered))  # any signal: the pools' rule leaves none unanswered (0)
        student = len(cache) if "student" in called else 0
        stage_rows(iteration.stage("discrimination"), {"teacher": teacher, "student": student, "referee": referee},
                   {"referee": reviews * (1 + config.roles.referee.parse_retries)} if reviews else None)
        answered |= {r["id"] for r in cache}
        calls, accepted = _generation(config, directory, acceptance)
        stage_rows(iteration.stage("generation"), {"generator": calls})
        generated_on_disk = iteration.stage("generation") in completed
        generated = read_jsonl(directory.generated) if generated_on_disk else [{"id": f"{iteration}/new/{i}"} for i in range(accepted)]
        pools.append({
            "iteration": str(iteration), "train": len(train), "cache": len(cache), "generated": len(generated),
            "pools_source": "actual" if on_disk else "predicted",
            "generated_source": "actual" if generated_on_disk else "predicted",
        })
    if config.imitation.final_imitation:
        final_pool = run.final.train_pool
        train = read_jsonl(final_pool) if final_pool.exists() else pools_from(FINAL, [], [], generated)[0]
        stage_rows(FINAL.stage("imitation"), {"teacher": len(uncached(train, answered))})
        pools.append({
            "iteration": str(FINAL), "train": len(train), "cache": None, "generated": None,
            "pools_source": "actual" if final_pool.exists() else "predicted", "generated_source": None,
        })
    return rows, pools


def _stage_rows(
    run: RunDir,
    stage: Stage,
    predicted: dict[str, int],
    finished: bool,
    per_call: dict,
    teacher_journal: list[TeacherAnswer],
    bounds: dict[str, int],
) -> list[dict]:
    """One row per role of a stage: counted from its journals once finished, else predicted (with
    the role's bound on its calls, where it has one)."""
    rows = []
    for role in stage_roles(stage.name):
        if role == "teacher":
            records = [r for r in teacher_journal if r.get("stage") == str(stage)]
        else:  # the referee's control pairs and the student's prefills (signal likelihood) included
            records = [r for path in call_journals(run.at(stage.iteration), role) for r in read_jsonl(path)]
        actual = usage(records)
        row = {"stage": str(stage), "role": role}
        if finished:
            row.update(calls=actual["calls"], prompt_tokens=actual["prompt_tokens"])
            row.update(completion_tokens=actual["completion_tokens"], source="actual", calls_so_far=actual["calls"])
        else:
            calls = max(predicted[role], actual["calls"])
            row.update(calls=calls, prompt_tokens=round(calls * per_call[role]["prompt_tokens"]))
            row.update(completion_tokens=round(calls * per_call[role]["completion_tokens"]))
            row.update(source="predicted", calls_so_far=actual["calls"])
            if role in bounds:
                row["calls_max"] = max(bounds[role], calls)
        rows.append(row)
    return rows


def _generation(config: Config, directory: IterationDir, acceptance: float) -> tuple[int, int]:
    """(generator calls, accepted instructions) predicted for an iteration's generation: the
    stage's own waves, each call of a side's wave passing in the expected share floor(size x a)."""
    labels = Counter(j["label"] for j in read_jsonl(directory.judgements))
    # Before its discrimination has judged, both sides are assumed to have seeds.
    seeds = (labels["hard"] + labels["any"], labels["easy"] + labels["any"]) if labels else (1, 1)
    quotas, budgets, _ = generation_quotas(config, *seeds)
    schedule = WaveSchedule(config.generation.expected_acceptance, quotas, budgets)
    for wave in iter(schedule.next_wave, []):
        for side in SIDES:
            size = sum(1 for each, _ in wave if each == side)
            passing = math.floor(round(size * acceptance, 6))
            for index in range(size):
                schedule.record(side, passed=index < passing)
    return sum(schedule.called.values()), sum(schedule.accepted.values())


def _sum(rows: list[dict]) -> dict:
    return {key: sum(r[key] for r in rows) for key in ("calls", "prompt_tokens", "completion_tokens")}


# ----------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------


def _training_note(training: dict) -> str:
    count = training["trainable_parameters"]
    return training["mode"] + (f", {count:,} trainable parameters per imitation" if count is not None else "")


def plan_lines(plan: dict) -> list[str]:
    """The plan as a readable table: a header with N0, G, iterations and assumptions, then rows."""
    done = len(plan["completed_stages"])
    where = f"started, {done} stage(s) done" if plan["started"] else "not started"
    final = ", then the final imitation" if plan["final_imitation"] else ""
    lines = [
        f"plan for {plan['run_dir']} ({where})",
        (
            f"N0 = {plan['seeds']:,} seeds from {plan['seeds_source']}; G = {plan['new_per_iteration']:,} new per "
            f"iteration; {plan['iterations']} iterations{final}"
        ),
        (
            f"generator acceptance {plan['generator_acceptance']:.2f}: {plan['generator_acceptance_source']}"
            f"{_contaminated_note(plan)}; "
            f"referee retries {plan['referee_retry_rate']:.3f} per review: {plan['referee_retry_source']}"
        ),
        f"discrimination.signal {plan['signal']}{SIGNAL_NOTES[plan['signal']]}",
        f"prompt tokens counted with {plan['token_counting']}",
        f"student training: {_training_note(plan['student_training'])}",
    ]
    for role, each in plan["per_call"].items():
        lines.append(
            f"  {role:<9} per call: prompt {each['prompt_tokens']:,.1f} ({each['prompt_source']}), "
            f"completion {each['completion_tokens']:,.1f} ({each['completion_source']})"
        )
    if not plan["started"]:
        lines.append("  predictions assume every generation quota is met (then the pools grow by G)")
    header = f"{'stage':<22}{'role':<11}{'calls':>11}{'prompt tokens':>16}{'completion tokens':>19}  source"
    lines += ["", header, "-" * len(header)]
    for row in plan["rows"]:
        note = row["source"]
        if row["source"] == "predicted" and row["calls_so_far"]:
            note += f" ({row['calls_so_far']:,} done)"
        if "calls_max" in row:
            note += f", at most {row['calls_max']:,} with every review retried"
        lines.append(_line(row["stage"], row["role"], row, note))
    lines.append("-" * len(header))
    for role, total in plan["totals"].items():
        lines.append(_line("total", role, total, ""))
    return lines


def _contaminated_note(plan: dict) -> str:
    observed = plan.get("generator_contaminated")
    return f", contaminated {observed['contaminated']:,} of {observed['replies']:,} replies" if observed else ""


def _line(stage: str, role: str, numbers: dict, note: str) -> str:
    return (
        f"{stage:<22}{role:<11}{numbers['calls']:>11,}{numbers['prompt_tokens']:>16,}"
        f"{numbers['completion_tokens']:>19,}  {note}"
    ).rstrip()
