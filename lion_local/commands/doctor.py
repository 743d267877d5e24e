"""`lion-local doctor`: prove every role works before a multi-day job is submitted.

Validates the config and its paths, starts (or reaches) every server a role uses, sends one
real request per role, parses each reply exactly as the stages do, and stops what it started.

Then it measures the referee as a discrimination would (lion_local/stages/referee_health.py): the
teacher answers a few seed instructions, and the referee reviews discrimination.referee_check
.control_pairs control pairs built from them, in both orders, in the configured mode and in every
other mode the referee's endpoint can serve. Each mode's readable, position-consistent and
control-accuracy shares are shown; the configured mode fails the doctor when it crosses a bound
that would stop a discrimination, naming the fix (and any mode that would pass).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from lion_local.config import Config
from lion_local.endpoints.access import api_key_for, check_access, check_launchers, check_models_exist, endpoint_dir
from lion_local.endpoints.client import EndpointClient, EndpointError
from lion_local.roles import (
    ask_generator,
    ask_referee,
    ask_student,
    ask_teacher,
    parse_generated_instruction,
    read_review,
    parse_teacher_answer,
)
from lion_local.run.records import instruction_record, request_seed
from lion_local.run.seed_data import load_seed_instructions
from lion_local.stages.judging import ORDERS, review_call
from lion_local.stages.referee_health import ControlPair, control_figures, control_pairs, referee_problem
from lion_local.smoke.tiny_models import ensure_tiny_models
from lion_local.endpoints.servers import client_for, server_log, wanted_server
from serving import (
    Endpoint, ServerError, ServerProcess, await_servers_async, check_configured_port, external_endpoint_async, launch_servers,
    stop_processes,
)

logger = logging.getLogger(__name__)


@dataclass
class Check:
    """One line of the doctor's report: a server start or a role's request."""

    name: str
    ok: bool
    detail: str
    raw: str | None = None
    parsed: str | None = None
    informational: bool = False  # shown, never failing (another referee mode than the configured one)


def run_doctor(config: Config, log_dir: Path) -> list[Check]:
    """All checks, in order; the caller reports them and exits non-zero if any failed."""
    names = config.servers_in_use()
    check_models_exist(config, names)
    check_launchers(config, names)
    for name in names:
        check_access(config, name)  # an unset key variable, or a server that may not start so, fails here
    seed = load_seed_instructions(config.seed_data, limit=1)[0]
    ensure_tiny_models(config)

    return asyncio.run(_start_and_check(config, names, log_dir, seed.instruction, seed.input))


async def _start_and_check(config: Config, names: list[str], log_dir: Path, instruction: str, input_text: str) -> list[Check]:
    """Every server loads at once; each is then waited for alone, so one failing stops only itself.
    The roles are then asked, and every server started here is stopped, side by side."""
    checks: list[Check] = []
    endpoints: dict[str, Endpoint] = {}
    processes: list[ServerProcess] = []  # filled as they start, stopped side by side at the end
    started = time.monotonic()
    try:
        launched, refused = _launch_local(config, names, log_dir, processes)
        for name in names:
            try:
                if name in refused:  # a configured port another process holds: nothing was started
                    raise refused[name]
                if name in launched:
                    [(_, endpoints[name])] = await await_servers_async([launched[name]])
                else:
                    key, directory = api_key_for(config, name), endpoint_dir(config, name)
                    endpoints[name] = await external_endpoint_async(name, config.servers[name], key, directory)
            except ServerError as exc:
                checks.append(Check(f"server {name}", False, str(exc)))
                continue
            where = ", ".join(endpoints[name].base_urls)
            ready = f"ready after {time.monotonic() - started:.1f} s"
            checks.append(Check(f"server {name}", True, f"{endpoints[name].engine} at {where} {ready}"))
        checks += await _check_roles(config, endpoints, instruction, input_text)
    finally:
        await asyncio.to_thread(stop_processes, processes)
    return checks


def _launch_local(
    config: Config, names: list[str], log_dir: Path, processes: list[ServerProcess]
) -> tuple[dict[str, tuple], dict[str, ServerError]]:
    """Start every server the doctor starts itself (each appended to `processes` first); one whose
    configured port another process holds is not started, and its error is that server's check."""
    launched: dict[str, tuple] = {}
    refused: dict[str, ServerError] = {}
    for name in names:
        if config.servers[name].engine == "external":
            continue
        try:
            check_configured_port(name, config.servers[name])
        except ServerError as exc:
            refused[name] = exc
            continue
        [launched[name]] = launch_servers([wanted_server(config, name, server_log(log_dir, name))], track=processes)
    return launched, refused


async def _check_roles(
    config: Config, endpoints: dict[str, Endpoint], instruction: str, input_text: str
) -> list[Check]:
    clients = {name: client_for(endpoint, config.servers[name]) for name, endpoint in endpoints.items()}
    roles = config.roles

    def client(role: str) -> EndpointClient | None:
        return clients.get(getattr(roles, role).server)

    try:
        teacher_check, teacher_answer = await _attempt(
            "teacher", client("teacher"),
            lambda c: ask_teacher(c, roles.teacher, instruction, input_text, seed=config.seed),
            lambda completion: parse_teacher_answer(completion.text),
            "the teacher returned an empty answer",
        )
        student_check, student_answer = await _attempt(
            "student", client("student"),
            lambda c: ask_student(c, roles.student, instruction, input_text, seed=config.seed),
            lambda completion: completion.text,
            "unreachable",
        )
        checks = [teacher_check, student_check]
        answers = (str(teacher_answer or "A short, correct answer."), str(student_answer or ""))
        checks.append(await _check_referee(config, client("referee"), instruction, input_text, answers))
        for offset, kind in enumerate(("hard", "easy")):
            generator_check, _ = await _attempt(
                f"generator ({kind})", client("generator"),
                lambda c: ask_generator(c, roles.generator, instruction, input_text, kind, seed=config.seed + offset),
                lambda completion: parse_generated_instruction(completion.text),
                "the reply did not hold exactly one new instruction",
            )
            checks.append(generator_check)
        checks += await _referee_health(config, client("teacher"), client("referee"))
    finally:
        for each in clients.values():
            await each.aclose()
    return unused_referee(config, checks)


def unused_referee(config: Config, checks: list[Check]) -> list[Check]:
    """With discrimination.signal likelihood or none the loop never asks the referee: its lines are
    shown (to choose a signal by), never failing."""
    signal = config.discrimination.signal
    if signal == "referee":
        return checks
    for check in checks:
        if check.name == "referee" or check.name.startswith("referee check"):
            verdict = "ok" if check.ok else "fails"
            check.detail = f"not used by the loop (discrimination.signal {signal}); for a referee run it {verdict}: {check.detail}"
            check.ok, check.informational = True, True
    return checks


async def _check_referee(
    config: Config, client: EndpointClient | None, instruction: str, input_text: str, answers: tuple[str, str]
) -> Check:
    """The referee in its configured mode, asked again (as the stages do) while its reply is unreadable."""
    role = config.roles.referee
    if role.mode == "explain_first":
        describe, hint = "could not read two scores (1-10) from the review", ""
    else:
        needs = "structured outputs" + (" and top_logprobs" if role.mode == "expected_score" else "")
        describe = (
            f"the reply is not the two scores of mode {role.mode}: the endpoint did not apply "
            f"roles.referee.structured_output: {role.structured_output} (vLLM follows regex, hosted APIs "
            "json_schema); set the form the endpoint supports, or roles.referee.mode: explain_first"
        )
        hint = (
            f"; mode {role.mode} needs {needs} from the referee's endpoint: serve it with vLLM, or set "
            "roles.referee.mode: explain_first"
        )
    for round_number in range(role.parse_retries + 1):
        check, _ = await _attempt(
            "referee", client,
            lambda c: ask_referee(c, role, instruction, input_text, *answers, seed=config.seed + round_number),
            lambda completion: read_review(completion, role),
            describe,
            hint,
        )
        if check.ok or check.raw is None:
            break
    check.detail = f"mode {role.mode}, {check.detail}" if check.ok else check.detail
    return check


async def _referee_health(config: Config, teacher: EndpointClient | None, referee: EndpointClient | None) -> list[Check]:
    """The referee on control pairs in each mode its endpoint serves (see the module docstring)."""
    wanted = config.discrimination.referee_check.control_pairs
    if teacher is None or referee is None or not wanted:
        return []
    seeds = load_seed_instructions(config.seed_data, limit=config.seed_limit)[: wanted + wanted // 2 + 1]
    records = [instruction_record(s.instruction, s.input, "seed", 0, None) for s in seeds]
    try:
        replies = await asyncio.gather(*(
            ask_teacher(teacher, config.roles.teacher, r["instruction"], r["input"],
                        seed=request_seed(config.seed, "doctor-teacher", r["id"]))
            for r in records
        ))
    except EndpointError as exc:
        return [Check("referee check", False, f"the teacher could not answer the control instructions: {exc}")]
    answers = {r["id"]: reply.text.strip() for r, reply in zip(records, replies)}
    controls = control_pairs(records, answers, wanted, config.seed)
    engine = config.servers[config.roles.referee.server].engine
    modes = [config.roles.referee.mode] + [
        mode for mode in ("expected_score", "scores_only", "explain_first")
        if mode != config.roles.referee.mode and (engine != "transformers" or mode == "explain_first")
    ]
    checks = [await _referee_mode(config, referee, controls, mode, mode == config.roles.referee.mode) for mode in modes]
    if not checks[0].ok:
        passing = [check.name.split()[-1] for check in checks[1:] if check.detail.startswith("would pass")]
        checks[0].detail += f"; modes that would pass here: {', '.join(passing)}" if passing else "; no mode passes here"
    return checks


async def _referee_mode(
    config: Config, referee: EndpointClient, controls: list[ControlPair], mode: str, configured: bool
) -> Check:
    role = config.roles.referee.model_copy(update={"mode": mode})
    check = config.discrimination.referee_check
    name = "referee check" if configured else f"referee check: {mode}"
    replies: list[dict] = []
    seed_of = lambda *key: request_seed(config.seed, "doctor-referee", *key)  # noqa: E731
    try:
        await asyncio.gather(*(
            review_call(referee, role, control.pair, order, 0, role.parse_retries, seed_of, replies.append)()
            for control in controls for order in ORDERS
        ))
    except EndpointError as exc:
        return Check(name, not configured, f"not served by this endpoint: {exc}", informational=not configured)
    figures = control_figures(controls, replies)
    shown = (
        f"mode {mode}: {figures['pairs']} control pairs, readable replies {_share(figures['readable_share'])}, "
        f"unjudged {_share(figures['unjudged_share'])}, position consistent {_share(figures['position_consistent_share'])}, "
        f"control accuracy {_share(figures['accuracy'])} ("
        + ", ".join(f"{kind} {_share(each['accuracy'])}" for kind, each in figures["by_kind"].items()) + ")"
    )
    problem = referee_problem(figures, check, mode, f"mode {mode}")
    if configured:
        return Check(name, problem is None, shown if problem is None else problem)
    verdict = "would pass" if problem is None else "would stop a discrimination"
    return Check(name, True, f"{verdict}: {shown}", informational=True)


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


async def _attempt(name: str, client: EndpointClient | None, call, parse, describe: str, hint: str = "") -> tuple[Check, object]:
    """One role's request: `parse` reads the completion (None: unreadable, described by `describe`)."""
    if client is None:
        return Check(name, False, "its server is not available"), None
    try:
        completion = await call(client)
    except EndpointError as exc:
        return Check(name, False, f"{exc}{hint}"), None
    parsed = parse(completion)
    summary = (
        f"{completion.seconds:.2f} s, {completion.prompt_tokens}+{completion.completion_tokens} tokens, "
        f"finish_reason={completion.finish_reason}"
    )
    if parsed is None:
        return Check(name, False, f"{describe}; {summary}", completion.text, None), None
    return Check(name, True, summary, completion.text, repr(parsed)), parsed


def one_line(text: str, limit: int = 300) -> str:
    """Newlines and other unprintable characters escaped, so each reply stays on one line."""
    flat = "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)
    return flat if len(flat) <= limit else flat[:limit] + "..."
