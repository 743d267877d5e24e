"""The shape of every journal line and summary file a run writes: type hints, never checked.

Each TypedDict names its file (lion_local.run.layout spells the paths) and its writer; a key is
required where every writer sets it, NotRequired where only some do.
"""

# No `from __future__ import annotations` here: Python 3.11 would then take NotRequired keys for required.
from typing import Literal, NotRequired, TypedDict

Side = Literal["hard", "easy"]
Origin = Literal["seed", "hard", "easy"]
Label = Literal["hard", "easy", "unjudged", "any"]  # any: signal none, a seed of either side
ReviewOrder = Literal["teacher_first", "student_first"]
ControlKind = Literal["empty", "cut", "other"]
Signal = Literal["referee", "likelihood", "none"]

# Journal lines of model calls


class CallFields(TypedDict):
    """What every journaled model call keeps (lion_local.endpoints.journaled.call_fields)."""
    finish_reason: str | None
    seed: int
    prompt_tokens: int
    completion_tokens: int
    seconds: float


class TeacherAnswer(CallFields):
    """teacher_answers.jsonl (RunDir.teacher_answers), the run-wide cache (lion_local.stages.teacher_answers)."""
    id: str
    answer: str  # "" when the reply held no answer
    empty: bool
    fingerprint: str  # teacher_fingerprint: a line of another fingerprint is not reused
    stage: str  # the stage that asked: "1/imitation", "2/discrimination", ...


class StudentAnswer(CallFields):
    """iter_<k>/student_answers.jsonl: the student's answers (discrimination, signal referee)."""
    id: str
    answer: str


class ReviewReply(CallFields):
    """One referee reply on one order of a pair (lion_local.stages.judging.review_call); each journal
    adds its own keys: Review, ControlReview, EvalJudgement."""
    id: str
    order: ReviewOrder
    attempt: int  # 0, then 1, 2, ... while unreadable (up to roles.referee.parse_retries)
    raw: str
    scores: list[float] | None  # None: unreadable


class Review(ReviewReply):
    """iter_<k>/reviews.jsonl: the referee's replies on the Cache Pool's pairs."""
    referee: str  # referee_fingerprint: the replies of another one are kept but not read


class ControlReview(Review):
    """iter_<k>/controls.jsonl: the referee's replies on its control pairs (lion_local.stages.referee_health)."""
    kind: ControlKind


class LikelihoodGap(TypedDict):
    """iter_<k>/likelihoods.jsonl: the student's NLL of one teacher answer (signal likelihood)."""
    id: str
    key: str  # the teacher answer, prompt format and cut it scores
    gap: float | None  # nll / tokens; None without answer tokens
    nll: float  # summed over the answer's tokens
    tokens: int
    prompt_tokens: int
    completion_tokens: int
    seconds: NotRequired[float]  # on the student's server only, not when scored in lion-local's process


class GeneratorCall(CallFields):
    """iter_<k>/generator_calls.jsonl: one generator reply (lion_local.stages.generation)."""
    side: Side
    attempt: int  # numbered per side
    parent: str  # the id of the Cache Pool instruction it was seeded with
    raw: str


class InstructionRecord(TypedDict):
    """train_pool.jsonl, cache_pool.jsonl and generated.jsonl (lion_local.run.records.instruction_record)."""
    id: str  # a content hash of (instruction, input)
    instruction: str
    input: str
    origin: Origin
    iteration: int  # 0 for a seed, else the iteration that generated it
    parent: str | None  # the instruction it was generated from


class PairScores(TypedDict):
    """A pair judged in both orders (lion_local.stages.judging.pair_scores)."""
    teacher_score: float
    student_score: float
    gap: float
    position_consistent: bool
    teacher_first: list[float]
    student_first: list[float]


class Judgement(TypedDict):
    """iter_<k>/judgements.jsonl: one label per Cache Pool instruction (lion_local.stages.discrimination)."""
    id: str
    teacher_score: float | None  # None: unjudged, or signal likelihood or none
    student_score: float | None
    gap: float | None  # signal likelihood: the NLL per token
    label: Label
    position_consistent: NotRequired[bool]  # signal referee, judged pairs: PairScores' keys
    teacher_first: NotRequired[list[float]]
    student_first: NotRequired[list[float]]


class Rejection(TypedDict):
    """iter_<k>/rejected.jsonl: a generator reply not accepted (lion_local.stages.generation)."""
    instruction: str | None  # None when the reply held no instruction
    reason: str  # the first check it failed, or "quota_reached"
    side: Side
    attempt: int
    parent: str
    raw: str
    similarity: NotRequired[float]  # the novelty check's ROUGE-L F, once it ran
    similar_to: NotRequired[str]  # too_similar: the id of the pool instruction
    question: NotRequired[str]  # contaminated: Contamination's keys
    question_similarity: NotRequired[float]
    shared_ngram: NotRequired[str]


class Contamination(TypedDict):
    """Why an instruction is too close to an evaluation question (lion_local.stages.decontamination)."""
    question: str  # the question's id
    question_similarity: NotRequired[float]  # its ROUGE-L F, when that check caught it
    shared_ngram: NotRequired[str]  # the n shared words, when the n-gram check caught it


class Question(TypedDict):
    """An evaluation question (lion_local.run.questions), or a held-out seed of `lion-local evaluate`."""
    id: str
    question: str
    category: str | None
    input: NotRequired[str]  # held-out seeds only, as `set`
    set: NotRequired[Literal["questions", "held_out"]]


class ServerStart(TypedDict):
    """servers.jsonl (RunDir.servers_journal): one line per server start (lion_local.endpoints.servers)."""
    server: str
    engine: str | None  # as the server reports it: "vllm 0.32.0"
    model: str | None
    base_url: str
    started_at: str  # %Y-%m-%dT%H:%M:%S%z


class TrainingExample(TypedDict):
    """iter_<k>/sft_data.jsonl: one SFT row, chat messages or text by roles.student.prompt_format."""
    id: str
    prompt: str | list[dict[str, str]]
    completion: str | list[dict[str, str]]


class TrainingResult(TypedDict):
    """iter_<k>/sft_result.json (lion_local.stages.sft); imitation.json's "training" adds wall_s."""
    trainable_parameters: int
    parameters: int
    examples: int
    steps: int
    tokens: int | None  # trained on, padding excluded
    train_loss: float
    train_runtime_s: float | None
    resumed: bool
    world_size: int
    gradient_accumulation_steps: int
    effective_batch_size: int
    distributed_type: str
    backend: str | None
    device: Literal["cuda", "cpu"]
    wall_s: NotRequired[float]


TrainingSkipped = TypedDict("TrainingSkipped", {"skipped": str})  # why: no training examples


class ImitationSummary(TypedDict):
    """iter_<k>/imitation.json and final/imitation.json (lion_local.stages.imitation)."""
    train_pool: int
    empty_teacher_answers: int
    truncated_teacher_answers: int
    dropped_truncated_answers: int
    base_checkpoint: str
    examples: int
    training: NotRequired[TrainingResult | TrainingSkipped]  # absent when the student was already trained


# A histogram bin ("from" is a keyword, hence the functional form).
HistogramBin = TypedDict("HistogramBin", {"from": float, "to": float, "count": int})


class ControlShares(TypedDict):
    """The referee on some control pairs (lion_local.stages.referee_health)."""
    pairs: int
    judged: int
    unjudged_share: float | None
    accuracy: float | None
    position_consistent_share: float | None


class RefereeFigures(ControlShares):
    """discrimination.json's "referee_check" (referee_health.control_figures)."""
    replies: int
    readable_share: float | None
    by_kind: dict[str, ControlShares]  # by ControlKind, for the kinds drawn


class DiscriminationSummary(TypedDict):
    """iter_<k>/discrimination.json (lion_local.stages.discrimination); its keys depend on the signal."""
    signal: Signal
    hard: int
    easy: int
    unjudged: int
    cache_pool: int
    referee_check: RefereeFigures | None  # None unless signal referee
    unjudged_share: NotRequired[float | None]  # signal referee or likelihood, as the two below
    empty_teacher_answers: NotRequired[int]
    truncated_teacher_answers: NotRequired[int]
    any: NotRequired[int]  # signal none: every Cache Pool instruction
    mean_gap: NotRequired[float | None]  # signal referee; likelihood: the mean NLL per token
    mean_teacher_score: NotRequired[float | None]  # signal referee, down to truncated_student_answers
    mean_student_score: NotRequired[float | None]
    gap_histogram: NotRequired[list[HistogramBin]]
    position_inconsistent_share: NotRequired[float | None]
    referee_replies: NotRequired[int]
    unreadable_referee_replies: NotRequired[int]
    empty_student_answers: NotRequired[int]
    truncated_student_answers: NotRequired[int]
    likelihood_quantile: NotRequired[float]  # signal likelihood (likelihood_gaps.likelihood_summary), as below
    threshold: NotRequired[float | None]
    nll_histogram: NotRequired[list[HistogramBin]]
    method: NotRequired[str]


# The decontamination and novelty checks of generation.json's "checks".
DecontaminationCheck = TypedDict(
    "DecontaminationCheck", {"questions": int, "checked": int, "rejected": int, "rouge_threshold": float, "ngram": int}
)
NoveltyCheck = TypedDict("NoveltyCheck", {"checked": int, "rejected": int, "rouge_threshold": float})


class GenerationChecks(TypedDict):
    """generation.json's "checks": each check with what it rejected, or "off"."""
    filters: dict[str, int | Literal["off"]]
    decontamination: DecontaminationCheck | Literal["off"]
    novelty: NoveltyCheck


class GenerationSummary(TypedDict):
    """iter_<k>/generation.json (lion_local.stages.generation); counts by Side, some with "total"."""
    wanted: int
    quota: dict[str, int]
    accepted: dict[str, int]  # hard, easy, total
    rejected: dict[str, int]  # by reason
    rejected_total: int
    calls: dict[str, int]
    budget: dict[str, int]
    shortfall: dict[str, int]  # hard, easy, total
    seeds: dict[str, int]
    checks: GenerationChecks
    notes: list[str]
    truncated_replies: int


# report.json of an iteration (lion_local.stages.iteration_report)


class Usage(TypedDict):
    """Calls, tokens and seconds of some journaled calls (iteration_report.usage)."""
    calls: int
    prompt_tokens: int
    completion_tokens: int
    seconds: float


class TeacherUsage(Usage):
    by_stage: dict[str, Usage]  # "imitation", "discrimination"


class RoleUsages(TypedDict):
    teacher: TeacherUsage
    student: NotRequired[Usage]  # numbered iterations only, as the two below
    referee: NotRequired[Usage]
    generator: NotRequired[Usage]


class PoolSizes(TypedDict):
    train: int
    cache: NotRequired[int]  # numbered iterations only, as the three below
    generated: NotRequired[int]
    next_train: NotRequired[int]
    next_cache: NotRequired[int]


class TruncatedCounts(TypedDict):
    teacher_answers: int
    teacher_answers_cache_pool: NotRequired[int]  # numbered iterations only, as the two below
    student_answers: NotRequired[int]
    generator_replies: NotRequired[int]


class ScoreFields(TypedDict):
    mean_teacher: float | None
    mean_student: float | None
    mean_gap: float | None
    gap_histogram: list[HistogramBin]
    position_inconsistent_share: float | None


LikelihoodGapFields = TypedDict(
    "LikelihoodGapFields",
    {"threshold": float | None, "likelihood_quantile": float | None, "nll_histogram": list[HistogramBin] | None},
)


class IterationReport(TypedDict):
    """iter_<k>/report.json and final/report.json (the final imitation's: the required keys only)."""
    iteration: int | Literal["final"]
    pools: PoolSizes
    imitation: ImitationSummary  # {} while imitation.json is missing
    roles: RoleUsages
    stage_seconds: dict[str, float]  # by stage marker
    engines: dict[str, str]  # server name -> engine, from servers.jsonl
    truncated: TruncatedCounts
    discrimination: NotRequired[DiscriminationSummary]  # {} while missing
    signal: NotRequired[Signal]  # "referee" for a summary without one
    likelihood_gaps: NotRequired[LikelihoodGapFields]  # signal likelihood only
    labels: NotRequired[dict[str, int]]  # hard, easy, unjudged
    scores: NotRequired[ScoreFields]
    generation: NotRequired[GenerationSummary]  # {} while missing
    referee_check: NotRequired[RefereeFigures | None]


# lion-local evaluate (lion_local.commands.evaluation): eval/ and eval/<checkpoint>/


class EvalTeacherAnswer(CallFields):
    """eval/teacher_answers.jsonl: the teacher's answer to a question or held-out seed."""
    id: str
    answer: str
    empty: bool
    key: str  # what it depends on: a line whose key no longer matches is asked again


class EvalStudentAnswer(CallFields):
    """eval/<checkpoint>/student_answers.jsonl."""
    id: str
    answer: str
    key: str


class EvalJudgement(ReviewReply):
    """eval/<checkpoint>/judgements.jsonl: the judge's replies."""
    key: str


class EvalLikelihood(TypedDict):
    """eval/<checkpoint>/likelihood.jsonl and eval/teacher_likelihood.jsonl: a model's NLL of a teacher answer."""
    id: str
    set: Literal["questions", "held_out"]
    key: str
    nll: float
    tokens: int
    prompt_tokens: NotRequired[int]  # scored on a server only, as the two below
    completion_tokens: NotRequired[int]
    seconds: NotRequired[float]


# result.json's "by_category": the relative score over the questions of one category.
CategoryScores = TypedDict("CategoryScores", {
    "questions": int, "judged": int, "teacher_total": float, "student_total": float, "relative_score": float | None,
})
NllFigure = TypedDict("NllFigure", {"mean_nll": float | None, "tokens": int, "answers": int})  # stages.likelihood.mean_nll
NllFigures = TypedDict("NllFigures", {"method": str, "questions": NllFigure | None, "held_out": NllFigure | None, "teacher": NotRequired["NllFigures"]})


class EvaluationResult(TypedDict):
    """eval/<checkpoint>/result.json (the initial student's: no judged keys)."""
    checkpoint: str  # "initial", "iter_1", ..., "final"
    iteration: int | str  # "initial" or "final", else the number
    judge: NotRequired[str]  # judged checkpoints only, down to by_category
    questions: NotRequired[int]
    judged: NotRequired[int]
    excluded_questions: NotRequired[int]
    unparseable_judgements: NotRequired[int]
    position_inconsistent_share: NotRequired[float | None]
    teacher_total: NotRequired[float]
    student_total: NotRequired[float]
    relative_score: NotRequired[float | None]
    by_category: NotRequired[dict[str, CategoryScores]]
    likelihood: NotRequired[NllFigures]  # evaluation_likelihood: each set's figure (None: not measured), the teacher's too
