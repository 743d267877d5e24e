"""Stage 3, generation: new instructions modelled on the hard and the easy ones.

    lion-local stage generation --config X

N = generation.new_per_iteration instructions are wanted, round(N x hard_ratio) from hard seeds
and the rest from easy seeds; when one side has no seeds the other fills the whole quota. Each
generator call takes a seed drawn uniformly from its side with an RNG fixed by (run seed,
iteration, side, attempt number), so a re-run draws the same seeds. With discrimination.signal
none every Cache Pool instruction is a seed of both sides (labelled `any`): the same quotas, the
same prompts, the same filters and budgets, only the seeds are drawn from the whole pool. A reply is decided by
these checks in this order, the first that fails naming the rejection reason: it parses as one
instruction (empty, unparseable), passes the post-filters (generation.filters: truncated,
banned_word, too_short, leading_punctuation, non_ascii_start), is not its seed word for word
(repeats_seed), is not contaminated (contaminated: its ROUGE-L F against every evaluation
question of generation.decontamination is at most its rouge_threshold and it shares no
`ngram`-word run with one; lion_local.stages.decontamination), is not a known id (duplicate) and
is novel (too_similar: its ROUGE-L F against every Cache Pool instruction and every instruction
accepted before it is at most generation.rouge_threshold; NoveltyIndex: rouge-score's exact
values); a reply passing them all is kept while its side's quota has room (quota_reached after).
Decontamination comes before the novelty check, so a contaminated instruction is never
compared with the pool, and it never counts as passing in the waves below. Each side may make
at most ceil(max_attempts_factor x its quota) calls; what it then still lacks is the shortfall.

Calls are made in waves. A side's wave is the fewest calls of which, with probability
WAVE_CONFIDENCE, enough pass (every check above) to fill what the side still lacks, each
passing with probability generation.expected_acceptance in the first wave and the share seen
passing so far after it: one wave usually finishes a side, so few waves wait on a straggler,
while the calls asked beyond the quota stay a few standard deviations of a binomial. Every reply
is journaled (generator_calls.jsonl); decisions are then taken in a fixed order (wave, side,
attempt), so the accepted and rejected instructions are a pure function of the journal (given
the Cache Pool, the config and the evaluation questions): a killed stage re-run replays the journal, asks only for the calls that were missing, and writes
generated.jsonl and rejected.jsonl whole after each wave.
"""

from __future__ import annotations

import json
import logging
import math
import random
import unicodedata
from collections import Counter
from contextlib import AsyncExitStack

from lion_local.config import Config, GenerationFilters
from lion_local.endpoints.client import EndpointClient
from lion_local.endpoints.journaled import call_all, call_fields
from lion_local.stages.decontamination import decontamination_index
from lion_local.stages.novelty import NoveltyIndex
from lion_local.stages.truncation import warn_truncated
from lion_local.run.records import by_id, instruction_id, instruction_record, pools_for, request_seed
from lion_local.roles import ask_generator, parse_generated_instruction
from lion_local.errors import StageOrderError
from lion_local.run.layout import Iteration, IterationDir, RunDir
from lion_local.run.record_types import GenerationChecks, GenerationSummary, GeneratorCall, InstructionRecord, Rejection
from lion_local.run.state import Journal, read_jsonl, write_atomic, write_jsonl_atomic
from lion_local.endpoints.servers import ServerSet

logger = logging.getLogger(__name__)

SIDES = ("hard", "easy")
WAVE_CONFIDENCE = 0.99
# A side whose replies almost all fail must still end within its budget, not in a wave per call.
MIN_ACCEPTANCE_ESTIMATE = 0.2


def seed_sides(cache_pool: list[InstructionRecord], labels: dict[str, str]) -> dict[str, list[InstructionRecord]]:
    """Each side's seeds: the Cache Pool instructions labelled with it, and those labelled `any`
    (discrimination.signal none: the whole Cache Pool on both sides, each drawn uniformly)."""
    return {side: [r for r in cache_pool if labels.get(r["id"]) in (side, "any")] for side in SIDES}


def plan_quotas(wanted: int, hard_ratio: float, hard_seeds: int, easy_seeds: int) -> tuple[dict[str, int], list[str]]:
    """How many instructions each side must produce, and notes on any change to the ratio."""
    hard = round(wanted * hard_ratio)
    quotas = {"hard": hard, "easy": wanted - hard}
    notes = []
    if hard_seeds == 0 and easy_seeds == 0:
        notes.append("no judged instructions (all unjudged): nothing to generate from")
        return {"hard": 0, "easy": 0}, notes
    if hard_seeds == 0 and quotas["hard"]:
        notes.append(f"no hard seeds: easy seeds fill the whole quota ({wanted} instead of {quotas['easy']})")
        quotas = {"hard": 0, "easy": wanted}
    elif easy_seeds == 0 and quotas["easy"]:
        notes.append(f"no easy seeds: hard seeds fill the whole quota ({wanted} instead of {quotas['hard']})")
        quotas = {"hard": wanted, "easy": 0}
    return quotas, notes


def wave_size(need: int, acceptance: float, limit: int) -> int:
    """The fewest calls, at most `limit`, of which at least `need` pass with probability
    WAVE_CONFIDENCE when each passes with probability `acceptance`."""
    if need <= 0 or limit <= 0:
        return 0
    acceptance = min(1.0, max(MIN_ACCEPTANCE_ESTIMATE, acceptance))
    if acceptance == 1.0 or limit <= need:
        return min(need, limit)
    if _at_least(need, limit, acceptance) < WAVE_CONFIDENCE:
        return limit
    low, high = need, limit
    while low < high:
        middle = (low + high) // 2
        if _at_least(need, middle, acceptance) >= WAVE_CONFIDENCE:
            high = middle
        else:
            low = middle + 1
    return low


def next_wave(
    expected_acceptance: float,
    quotas: dict[str, int],
    budgets: dict[str, int],
    accepted: dict[str, int],
    called: dict[str, int],
    passed: int,
    decided: int,
) -> dict[str, int]:
    """Each side's next wave size: sized at the expected acceptance until replies have been
    decided, then at the share of them that passed."""
    rate = passed / decided if decided else expected_acceptance
    return {side: wave_size(quotas[side] - accepted[side], rate, budgets[side] - called[side]) for side in SIDES}


class WaveSchedule:
    """Which generator calls come next, wave by wave, and what the decided ones did.

    The stage records each reply's outcome; `lion-local plan` records the outcomes it expects,
    so both walk the same waves.
    """

    def __init__(self, expected_acceptance: float, quotas: dict[str, int], budgets: dict[str, int]) -> None:
        self.expected_acceptance, self.quotas, self.budgets = expected_acceptance, quotas, budgets
        self.accepted = {side: 0 for side in SIDES}
        self.called = {side: 0 for side in SIDES}
        self.passed = self.decided = 0  # passed: every check of the decisions, within quota or not

    def next_wave(self) -> list[tuple[str, int]]:
        """(side, attempt) of each call of the next wave, attempts numbered per side; [] at the end."""
        sizes = next_wave(
            self.expected_acceptance, self.quotas, self.budgets, self.accepted, self.called, self.passed, self.decided
        )
        wave = [(side, attempt) for side, size in sizes.items() for attempt in range(self.called[side], self.called[side] + size)]
        for side, size in sizes.items():
            self.called[side] += size
        return wave

    def record(self, side: str, passed: bool) -> bool:
        """Count one decided reply; True when it passed and its side's quota still had room."""
        self.decided += 1
        if not passed:
            return False
        self.passed += 1
        if self.accepted[side] >= self.quotas[side]:
            return False
        self.accepted[side] += 1
        return True


def generation_quotas(config: Config, hard_seeds: int, easy_seeds: int) -> tuple[dict[str, int], dict[str, int], list[str]]:
    """(quota per side, call budget per side, notes) of one generation stage."""
    settings = config.generation
    quotas, notes = plan_quotas(settings.new_per_iteration, settings.hard_ratio, hard_seeds, easy_seeds)
    budgets = {side: math.ceil(settings.max_attempts_factor * quotas[side]) for side in SIDES}
    return quotas, budgets, notes


def _at_least(k: int, n: int, p: float) -> float:
    """P(Binomial(n, p) >= k), summed in log space so that n in the tens of thousands is exact."""
    log_p, log_q, log_n_factorial = math.log(p), math.log1p(-p), math.lgamma(n + 1)
    return math.fsum(
        math.exp(log_n_factorial - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p + (n - i) * log_q)
        for i in range(k, n + 1)
    )


def filter_reason(text: str, finish_reason: str | None, filters: GenerationFilters) -> tuple[str | None, str | None]:
    """(instruction, None) when a reply passes the post-filters, else (instruction or None, reason)."""
    if not text.strip():
        return None, "empty"
    instruction = parse_generated_instruction(text)
    if instruction is None:
        return None, "unparseable"
    if filters.drop_truncated and finish_reason == "length":
        return instruction, "truncated"
    lowered = instruction.lower()
    if any(word.lower() in lowered for word in filters.banned_words):
        return instruction, "banned_word"
    if len(instruction.split()) < filters.min_words:
        return instruction, "too_short"
    first = instruction[0]
    if filters.drop_leading_punctuation and unicodedata.category(first).startswith(("P", "S")):
        return instruction, "leading_punctuation"
    if filters.drop_non_ascii_start and not first.isascii():
        return instruction, "non_ascii_start"
    return instruction, None


async def run_generation(config: Config, run: RunDir, iteration: Iteration, servers: ServerSet) -> GenerationSummary:
    """Run (or finish) an iteration's generation; return the stage summary. The generator's server
    starts at the first wave with a call to make; every wave shares its client."""
    directory = run.at(iteration)
    _, cache_pool = pools_for(config, run, iteration)
    if not directory.judgements.exists():
        raise StageOrderError(
            f"{iteration.stage('generation')} needs {directory.judgements} from "
            f"{iteration.stage('discrimination')}; run that first"
        )
    seeds = seed_sides(cache_pool, {j["id"]: j["label"] for j in read_jsonl(directory.judgements)})
    quotas, budgets, notes = generation_quotas(config, len(seeds["hard"]), len(seeds["easy"]))
    schedule = WaveSchedule(config.generation.expected_acceptance, quotas, budgets)
    decisions = _Decisions(config, iteration, cache_pool)
    with Journal(directory.generator_calls) as journal:
        replies = {(r["side"], r["attempt"]): r for r in journal.records}
        async with AsyncExitStack() as stack:
            client: EndpointClient | None = None
            for wave in iter(schedule.next_wave, []):
                missing = [(side, attempt) for side, attempt in wave if (side, attempt) not in replies]
                if missing:
                    if client is None:
                        client = await stack.enter_async_context(await servers.open_client(config.roles.generator.server))
                    await _call_generator(config, iteration, missing, seeds, journal, replies, client)
                for side, attempt in wave:
                    decisions.decide(schedule, replies[(side, attempt)])
                decisions.write(directory)
    # An empty wave list on the first pass (nothing to generate) still leaves both files behind.
    decisions.write(directory)
    summary = _summary(config, schedule, decisions, notes, seeds)
    summary["truncated_replies"] = warn_truncated(
        str(iteration.stage("generation")), "generator", list(replies.values()), config.roles.generator.warn_truncated_share,
        "roles.generator.max_tokens or roles.generator.length_budget_factor",
    )
    write_atomic(directory.generation_summary, json.dumps(summary, indent=2) + "\n")
    return summary


class _Decisions:
    """The accepted and rejected instructions, decided reply by reply in the journal's fixed order."""

    def __init__(self, config: Config, iteration: Iteration, cache_pool: list[InstructionRecord]) -> None:
        self.filters, self.iteration = config.generation.filters, iteration
        self.decontamination = decontamination_index(config)  # None when generation.decontamination is off
        self.index = NoveltyIndex(config.generation.rouge_threshold)
        self.pool_ids: list[str] = []  # by position in the index
        for record in cache_pool:
            self.index.add(record["instruction"])
            self.pool_ids.append(record["id"])
        self.pool = by_id(cache_pool)
        self.known_ids = set(self.pool)
        self.accepted: list[InstructionRecord] = []
        self.rejected: list[Rejection] = []
        self.checked: Counter[str] = Counter()  # replies that reached each check

    def decide(self, schedule: WaveSchedule, reply: GeneratorCall) -> None:
        side = reply["side"]
        instruction, reason = filter_reason(reply["raw"], reply["finish_reason"], self.filters)
        entry = {"side": side, "attempt": reply["attempt"], "parent": reply["parent"], "raw": reply["raw"]}
        if reason is None and instruction.strip() == self.pool[reply["parent"]]["instruction"].strip():
            reason = "repeats_seed"
        if reason is None and self.decontamination is not None:
            self.checked["decontamination"] += 1
            contaminated = self.decontamination.check(instruction)
            if contaminated is not None:
                reason = "contaminated"
                entry.update(contaminated)  # the question's id, and its ROUGE-L F or the shared n-gram
        if reason is None:
            self.checked["novelty"] += 1
            novel, similarity, similar_index = self.index.check(instruction)
            entry["similarity"] = round(similarity, 6)
            if instruction_id(instruction, "") in self.known_ids:
                reason = "duplicate"
            elif not novel:
                reason = "too_similar"
                entry["similar_to"] = self.pool_ids[similar_index]
        within_quota = schedule.record(side, passed=reason is None)
        if reason is None and not within_quota:
            reason = "quota_reached"
        if reason is not None:
            self.rejected.append({"instruction": instruction, "reason": reason, **entry})
            return
        record = instruction_record(instruction, "", side, self.iteration.number, reply["parent"])
        self.accepted.append(record)
        self.known_ids.add(record["id"])
        self.index.add(instruction)
        self.pool_ids.append(record["id"])

    def write(self, directory: IterationDir) -> None:
        write_jsonl_atomic(directory.generated, self.accepted)
        write_jsonl_atomic(directory.rejected, self.rejected)


def _summary(
    config: Config, schedule: WaveSchedule, decisions: _Decisions, notes: list[str], seeds: dict[str, list[InstructionRecord]]
) -> dict:
    settings, quotas, budgets = config.generation, schedule.quotas, schedule.budgets
    shortfall = {side: quotas[side] - schedule.accepted[side] for side in SIDES}
    for side in SIDES:
        if shortfall[side]:
            notes.append(
                f"{side}: {shortfall[side]} short of {quotas[side]} after {schedule.called[side]} calls "
                f"(budget ceil({settings.max_attempts_factor} x quota) = {budgets[side]})"
            )
    return {
        "wanted": settings.new_per_iteration,
        "quota": quotas,
        "accepted": {**schedule.accepted, "total": len(decisions.accepted)},
        "rejected": dict(sorted(Counter(r["reason"] for r in decisions.rejected).items())),
        "rejected_total": len(decisions.rejected),
        "calls": dict(schedule.called),
        "budget": budgets,
        "shortfall": {**shortfall, "total": sum(shortfall.values())},
        "seeds": {side: len(seeds[side]) for side in SIDES},
        "checks": checks_summary(config, decisions.checked, Counter(r["reason"] for r in decisions.rejected),
                                 len(decisions.decontamination) if decisions.decontamination is not None else None),
        "notes": notes,
    }


def checks_summary(config: Config, checked: Counter, rejected: Counter, questions: int | None) -> GenerationChecks:
    """Every check generation applied, with what it was given and how many replies it rejected (0
    included), so a report shows that a check ran even when it rejected nothing; an off check is
    recorded as off."""
    filters, decontamination = config.generation.filters, config.generation.decontamination
    enabled = {
        "truncated": filters.drop_truncated,
        "banned_word": bool(filters.banned_words),
        "too_short": True,
        "leading_punctuation": filters.drop_leading_punctuation,
        "non_ascii_start": filters.drop_non_ascii_start,
    }
    checks: dict = {"filters": {reason: rejected.get(reason, 0) if on else "off" for reason, on in enabled.items()}}
    checks["decontamination"] = (
        {
            "questions": questions,
            "checked": checked.get("decontamination", 0),
            "rejected": rejected.get("contaminated", 0),
            "rouge_threshold": decontamination.rouge_threshold,
            "ngram": decontamination.ngram,
        }
        if questions is not None
        else "off"
    )
    checks["novelty"] = {
        "checked": checked.get("novelty", 0),
        "rejected": rejected.get("too_similar", 0) + rejected.get("duplicate", 0),
        "rouge_threshold": config.generation.rouge_threshold,
    }
    return checks


async def _call_generator(
    config: Config,
    iteration: Iteration,
    wanted: list[tuple[str, int]],
    seeds: dict[str, list[InstructionRecord]],
    journal: Journal,
    replies: dict[tuple[str, int], GeneratorCall],
    client: EndpointClient,
) -> None:
    role = config.roles.generator
    k = iteration.number  # in the request seeds

    def call(side: str, attempt: int):
        async def ask() -> GeneratorCall:
            draw = random.Random(request_seed(config.seed, "generator-seed", k, side, attempt))
            parent = seeds[side][draw.randrange(len(seeds[side]))]
            seed = request_seed(config.seed, "generator", k, side, attempt)
            completion = await ask_generator(client, role, parent["instruction"], parent["input"], side, seed=seed)
            return {
                "side": side,
                "attempt": attempt,
                "parent": parent["id"],
                "raw": completion.text,
                **call_fields(completion, seed),
            }

        return ask

    await call_all(
        [call(side, attempt) for side, attempt in wanted],
        journal,
        f"{iteration.stage('generation')}: generator",
        on_record=lambda reply: replies.__setitem__((reply["side"], reply["attempt"]), reply),
    )
