"""The run: guard → provision → setup → baseline → agent → extract → verify → policy →
publish → report, each phase's output persisted before the next one starts.

    workflow = Workflow(store, mirrors, forge, agent_options, options)
    record = await workflow.solve(IssueRef.parse("local:/srv/repo.git#1"))

Extraction comes right after the agent (before verification): it is the checkpoint that
puts the agent's commits in the host's mirror, so verification runs in a fresh sandbox
seeded from the mirror (nothing the agent left behind — processes, `.git` config,
caches — can touch the evidence), and a crash after it loses nothing.

Resuming: a run is driven from its first phase without output. Phases that need a sandbox
get a new one seeded at the right commit with the setup commands re-run; a run that
stopped between the agent and the extraction runs the agent again (its sandbox is gone).

A run ends by finishing the report phase (done, nothing_verified) or by `RunEnded`
(caught in `_drive` only), which reports the reason on the issue and pushes the partial
branch when there is one and the policy allows it.
"""

from __future__ import annotations

import contextlib
import fnmatch
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from forgehand.agent.budget import Budgets, total_tokens
from forgehand.agent.exceptions import EndReason
from forgehand.agent.loop import Agent, AgentResult, AgentSettings
from forgehand.agent.model import ModelProvider
from forgehand.agent.prompt import IssueComment, Task, build_prompt
from forgehand.agent.runner_executor import RunnerToolExecutor
from forgehand.agent.step_tools import repository_executor
from forgehand.agent.trajectory import Trajectory
from forgehand.agent.workspace import GitError
from forgehand.agent.workspaces import NO_SANDBOX, WorkspaceError, check_env
from forgehand.forge.base import AccessLevel, Forge, IssueRef, IssueState, NewMergeRequest, Reaction
from forgehand.forge.errors import ForgeError
from forgehand.runner.errors import RunnerError
from forgehand.steps.masking import Masker
from forgehand.workflow import texts
from forgehand.workflow.evidence import SuiteReport, run_tests
from forgehand.workflow.mirror import Mirror, MirrorCache, credential_env, result_ref
from forgehand.workflow.model import (
    PHASES,
    ClaimKind,
    Outcome,
    Phase,
    RunEnded,
    RunRecord,
)
from forgehand.workflow.policy import PolicyReport, protected_hits, secret_hits, size_hits
from forgehand.workflow.progress import Progress, SilentProgress
from forgehand.workflow.repo_config import (
    CONFIG_PATH,
    RepoConfigError,
    ResolvedConfig,
    detect,
    effective_budgets,
    parse_repo_config,
)
from forgehand.workflow.session import (
    Session,
    commit_in_sandbox,
    diff_changes,
    extract_bundle,
    open_session,
    run_setup,
)
from forgehand.workflow.store import RunStore
from forgehand.workflow.verify import (
    FileChange,
    Verification,
    is_test_path,
    judge,
    nothing_verified,
)

Output = dict[str, Any]
PhaseHook = Callable[[RunRecord, Phase], Awaitable[None]]
_AGENT_OUTCOMES = {
    EndReason.MAX_STEPS: Outcome.BUDGET,
    EndReason.MAX_TOKENS: Outcome.BUDGET,
    EndReason.MAX_COST: Outcome.BUDGET,
    EndReason.MAX_SECONDS: Outcome.BUDGET,
    EndReason.MODEL_ERROR: Outcome.MODEL_ERROR,
    EndReason.SANDBOX_FAULT: Outcome.SANDBOX_FAULT,
}


@dataclass(frozen=True)
class AgentOptions:
    """The model side: a provider per agent phase, budgets, loop settings, secrets to mask."""

    provider: Callable[[], ModelProvider]
    budgets: Budgets = field(default_factory=Budgets)
    settings: AgentSettings = field(default_factory=AgentSettings)
    secrets: tuple[str, ...] = ()


@dataclass(frozen=True)
class WorkflowOptions:
    """Where runs happen: the sandbox backend (or none), the state directory, and the
    sandboxes' root file system: the operator's `root` (a spec's root, as in
    `open_workspace`; None: the host's) unless the repository names an `image` matching
    one of `allowed_images` (shell patterns; the operator's own image always matches)."""

    sandbox: str
    home: Path
    path_prefix: tuple[str, ...] = (str(Path(sys.executable).parent),)
    root: dict[str, str] | None = None
    allowed_images: tuple[str, ...] = ()

    def root_for(self, image: str | None) -> dict[str, str] | None:
        """The root a run's sandboxes get, given the repository's `image` (or None).
        RunEnded(config_error) when the repository asks for what this forgehand cannot give."""
        if image is None:
            return self.root
        if self.sandbox == NO_SANDBOX:
            raise RunEnded(
                Outcome.CONFIG_ERROR,
                f"{CONFIG_PATH} asks for the image {image!r}, but this forgehand runs without "
                "a sandbox (--sandbox none): run it with a sandbox, or remove `image`",
            )
        own = self.root is not None and self.root.get("name") == image
        if not own and not any(fnmatch.fnmatchcase(image, p) for p in self.allowed_images):
            allowed = ", ".join(self.allowed_images) or "none"
            raise RunEnded(
                Outcome.CONFIG_ERROR,
                f"{CONFIG_PATH} asks for the image {image!r}, which the operator does not "
                f"allow (allowed: {allowed}): ask them to add --allow-image {image}, or "
                "remove `image`",
            )
        return {"type": "image", "name": image}

    def trajectory(self, run_id: str) -> Path:
        return self.home / "runs" / run_id / "trajectory.jsonl"


@dataclass
class _Run:
    record: RunRecord
    ref: IssueRef
    outputs: dict[Phase, Output]
    mirror: Mirror | None = None
    session: Session | None = None
    session_stack: contextlib.AsyncExitStack | None = None

    @property
    def run_id(self) -> str:
        return self.record.run_id

    def out(self, phase: Phase) -> Output:
        return self.outputs[phase]

    @property
    def base(self) -> str:
        return str(self.outputs[Phase.PROVISION]["base"])

    @property
    def resolved(self) -> ResolvedConfig:
        return ResolvedConfig.model_validate(self.outputs[Phase.SETUP]["config"])


class Workflow:
    """Drives runs for one forge project."""

    def __init__(
        self,
        store: RunStore,
        mirrors: MirrorCache,
        forge: Forge,
        agent: AgentOptions,
        options: WorkflowOptions,
        *,
        progress: Progress | None = None,
        after_phase: PhaseHook | None = None,
    ) -> None:
        self.store = store
        self.mirrors = mirrors
        self.forge = forge
        self.agent = agent
        self.options = options
        self.progress = progress or SilentProgress()
        self.after_phase = after_phase
        self._handlers: dict[Phase, Callable[[_Run], Awaitable[Output]]] = {
            Phase.GUARD: self._guard,
            Phase.PROVISION: self._provision,
            Phase.SETUP: self._setup,
            Phase.BASELINE: self._baseline,
            Phase.AGENT: self._agent,
            Phase.EXTRACT: self._extract,
            Phase.VERIFY: self._verify,
            Phase.POLICY: self._policy,
            Phase.PUBLISH: self._publish,
            Phase.REPORT: self._report,
        }

    @property
    def secrets(self) -> list[str]:
        credentials = self.forge.credentials()
        token = credentials.password.get_secret_value() if credentials else ""
        return [s for s in (*self.agent.secrets, token) if s]

    async def solve(self, ref: IssueRef, requester: str | None = None) -> RunRecord:
        """Start a run for the issue, or resume an interrupted one, or collapse into a live one."""
        claim = await self.store.claim(str(ref), requester or "")
        if claim.kind is ClaimKind.COLLAPSED:
            self.progress.note(f"run {claim.run.run_id} is already working on {ref}: collapsed")
            return claim.run
        if claim.kind is ClaimKind.RESUMED:
            self.progress.note(f"resuming interrupted run {claim.run.run_id}")
        return await self._drive(claim.run, ref)

    async def resume(self, run_id: str) -> RunRecord:
        record = await self.store.get(run_id)
        return await self._drive(record, IssueRef.parse(record.issue))

    # -- the driver -----------------------------------------------------------------------

    async def _drive(self, record: RunRecord, ref: IssueRef) -> RunRecord:
        run = _Run(record, ref, dict(record.outputs))
        self.progress.note(f"run {run.run_id} for {ref}")
        try:
            for phase in self._remaining(run):
                await self._phase(run, phase)
            await self._finish(run, self._final_outcome(run), "published")
        except RunEnded as end:
            await self._end(run, end)
        except Exception as exc:
            classified = _classify(exc)
            if classified is None:
                raise
            await self._end(run, classified)
        finally:
            await self._close_session(run)
        return await self.store.get(run.run_id)

    def _remaining(self, run: _Run) -> list[Phase]:
        first = run.record.next_phase()
        if first is None:
            return []
        if first is Phase.EXTRACT:  # the agent's sandbox is gone: work again
            first = Phase.AGENT
        return list(PHASES[PHASES.index(first) :])

    async def _phase(self, run: _Run, phase: Phase) -> None:
        await self.store.start_phase(run.run_id, phase)
        self.progress.phase(phase, "start")
        output = await self._handlers[phase](run)
        await self.store.complete_phase(run.run_id, phase, output)
        run.outputs[phase] = output
        self.progress.phase(phase, "done", str(output.get("detail", "")))
        if self.after_phase is not None:
            await self.after_phase(run.record, phase)

    def _final_outcome(self, run: _Run) -> Outcome:
        verdict = Verification.model_validate(run.out(Phase.VERIFY)["verification"]).verdict
        return Outcome.NOTHING_VERIFIED if verdict == "nothing_verified" else Outcome.DONE

    async def _finish(self, run: _Run, outcome: Outcome, message: str) -> None:
        await self.store.finish(run.run_id, outcome, message)
        self.progress.note(f"run {run.run_id} ended: {outcome.value} — {message}")

    async def _end(self, run: _Run, end: RunEnded) -> None:
        end = await self._sandbox_account(run, end)
        await self._close_session(run)
        branch = await self._push_partial(run, end)
        await self._comment_failure(run, end, branch)
        await self._finish(run, end.outcome, end.message)

    async def _sandbox_account(self, run: _Run, end: RunEnded) -> RunEnded:
        """A sandbox fault told by the sandbox itself, when it stopped on its own: gVisor
        ends the whole sandbox when it runs out of memory, and the runner's client only
        saw its runner vanish."""
        if end.outcome is not Outcome.SANDBOX_FAULT or run.session is None:
            return end
        why = await run.session.space.why_ended()
        if why is None:
            return end
        message = f"the sandbox ended on its own ({why}), so the run could not go on"
        return RunEnded(Outcome.SANDBOX_FAULT, message, **end.details)

    # -- guard --------------------------------------------------------------------------

    async def _guard(self, run: _Run) -> Output:
        number = run.ref.number
        issue = await self.forge.get_issue(number)
        requester = run.record.requester or issue.author
        reasons = []
        if issue.state is not IssueState.OPEN:
            reasons.append(f"the issue is {issue.state.value}")
        if issue.locked:
            reasons.append("the issue is locked")
        if await self.forge.user_access(requester) < AccessLevel.WRITE:
            reasons.append(f"{requester} has no write access to the project")
        if reasons:
            raise RunEnded(Outcome.REFUSED, "; ".join(reasons), comment=not issue.locked)
        with contextlib.suppress(ForgeError):
            await self.forge.add_reaction(number, Reaction.EYES)
        comments = await self._trusted_comments(number)
        return {
            "issue": {
                "number": number,
                "title": issue.title,
                "body": issue.body,
                "author": issue.author,
                "url": issue.web_url,
            },
            "requester": requester,
            "comments": comments,
            "branch": await self._branch(run, issue.title),
            "detail": f"#{number} {issue.title!r}, requested by {requester}",
        }

    async def _trusted_comments(self, number: int) -> list[dict[str, str]]:
        access: dict[str, bool] = {}
        kept = []
        for comment in await self.forge.list_comments(number):
            if comment.author not in access:
                level = await self.forge.user_access(comment.author)
                access[comment.author] = level >= AccessLevel.WRITE
            if access[comment.author]:
                kept.append({"author": comment.author, "body": comment.body})
        return kept

    async def _branch(self, run: _Run, title: str) -> str:
        for earlier in await self.store.runs_for_issue(str(run.ref)):
            branch = earlier.outputs.get(Phase.GUARD, {}).get("branch")
            if branch and earlier.run_id != run.run_id:
                return str(branch)
        return texts.branch_name(run.ref.number, title)

    # -- provision, setup, baseline -------------------------------------------------------

    async def _provision(self, run: _Run) -> Output:
        url = await self.forge.clone_url()
        mirror = await self.mirrors.sync(url, self.forge.credentials())
        run.mirror = mirror
        return {
            "clone_url": url,
            "mirror": str(mirror.path),
            "default_branch": mirror.default_branch,
            "base": mirror.head,
            "detail": f"mirror at {mirror.default_branch} {mirror.head[:12]}",
        }

    def _mirror(self, run: _Run) -> Mirror:
        if run.mirror is None:
            out = run.out(Phase.PROVISION)
            run.mirror = Mirror(
                Path(out["mirror"]), out["clone_url"], out["default_branch"], out["base"]
            )
        return run.mirror

    async def _setup(self, run: _Run) -> Output:
        resolved = await self._resolve_config(self._mirror(run), run.base)
        run.outputs[Phase.SETUP] = {"config": resolved.model_dump(mode="json")}
        session = await self._agent_session(run)
        self.progress.note(f"sandbox: {session.space.detail}")
        test = resolved.config.test
        detail = (
            f"{resolved.source}: {resolved.detail}; tests: {test.command if test else 'none'}; "
            f"sandbox: {session.space.detail}"
        )
        return {
            "config": resolved.model_dump(mode="json"),
            "sandbox": session.space.detail,
            "detail": detail,
        }

    async def _resolve_config(self, mirror: Mirror, base: str) -> ResolvedConfig:
        text = await mirror.show(base, CONFIG_PATH)
        if text is not None:
            config = parse_repo_config(text)
            return ResolvedConfig(config=config, source="file", detail=CONFIG_PATH)
        files = (await mirror.git("ls-tree", "-r", "--name-only", base)).splitlines()
        return detect(files, await mirror.show(base, "package.json"))

    async def _agent_session(self, run: _Run) -> Session:
        if run.session is None:
            stack = contextlib.AsyncExitStack()
            run.session_stack = stack
            run.session = await self._open(stack, run, run.base)
        return run.session

    async def _open(self, stack: contextlib.AsyncExitStack, run: _Run, commit: str) -> Session:
        session = await stack.enter_async_context(
            open_session(
                self.options.sandbox,
                self._mirror(run),
                commit,
                path_prefix=self.options.path_prefix,
                network=run.resolved.config.sandbox_network(),
                root=self.options.root_for(run.resolved.config.image),
            )
        )
        check_env(session.space.env, self.secrets)
        await run_setup(session, run.resolved.config.setup)
        return session

    async def _close_session(self, run: _Run) -> None:
        stack, run.session_stack, run.session = run.session_stack, None, None
        if stack is not None:
            await stack.aclose()

    async def _baseline(self, run: _Run) -> Output:
        test = run.resolved.config.test
        if test is None:
            return {"report": None, "detail": "no test command: nothing to run"}
        session = await self._agent_session(run)
        report = await run_tests(
            session.client, test.command, session.repo_dir, session.space.env, test.timeout_seconds
        )
        return {"report": report.model_dump(mode="json"), "detail": report.counts()}

    # -- agent and extract ----------------------------------------------------------------

    async def _agent(self, run: _Run) -> Output:
        session = await self._agent_session(run)
        guard = run.out(Phase.GUARD)
        # The checkout is the default branch's head: repository steps are read from there.
        executor, problems = await repository_executor(
            session.client,
            session.repo_host,
            session.repo_dir,
            session.space.env,
            step_cache=session.step_cache,
            oom_kills=session.space.oom_kills,
        )
        for problem in problems:
            self.progress.note(f"skipped a repository step: {problem}")
        task = Task(
            title=guard["issue"]["title"],
            body=guard["issue"]["body"],
            comments=tuple(IssueComment(c["author"], c["body"]) for c in guard["comments"]),
            reference=f"#{run.ref.number}",
        )
        system, message = await build_prompt(
            task, session.repo_host, executor.tools(), lambda _author: True
        )
        result = await self._run_agent(run, executor, system, message)
        return _agent_output(result, self.options.trajectory(run.run_id))

    async def _run_agent(
        self, run: _Run, executor: RunnerToolExecutor, system: Any, message: Any
    ) -> AgentResult:
        secrets = self.secrets
        path = self.options.trajectory(run.run_id)
        trajectory = Trajectory(path, Masker(secrets), observer=self.progress.agent_event)
        budgets = effective_budgets(run.resolved.config.budgets, self.agent.budgets)
        provider = self.agent.provider()
        agent = Agent(
            provider,
            executor,
            budgets=budgets,
            settings=self.agent.settings,
            trajectory=trajectory,
            secrets=secrets,
        )
        try:
            return await agent.run(system, message)
        finally:
            await provider.aclose()

    async def _extract(self, run: _Run) -> Output:
        session = run.session
        if session is None:
            raise RunEnded(Outcome.INTERNAL, "the agent's sandbox is gone before extraction")
        guard, agent = run.out(Phase.GUARD), run.out(Phase.AGENT)
        if await session.space.why_ended(grace=0):  # nothing left to commit from
            raise self._agent_end(agent) or RunEnded(
                Outcome.SANDBOX_FAULT, "the sandbox ended before extraction"
            )
        message = texts.commit_message(run.ref.number, guard["issue"]["title"], agent["summary"])
        try:
            commit = await commit_in_sandbox(
                session, message, [texts.co_author(guard["requester"])]
            )
        except RunEnded as failed:  # the agent's own ending, if any, is the real reason
            raise self._agent_end(agent, also=failed.message) or failed from None
        if commit is None:
            raise self._agent_end(agent) or RunEnded(
                Outcome.NO_CHANGES, "the agent finished without changing anything"
            )
        result = await extract_bundle(session, self._mirror(run), run.base, run.run_id)
        await self._close_session(run)
        end = self._agent_end(agent)
        if end is not None:
            end.details["partial"] = result
            await self.store.complete_phase(run.run_id, Phase.EXTRACT, {"commit": result})
            raise end
        return {"commit": result, "detail": f"result {result[:12]} in the mirror"}

    def _agent_end(self, agent: Output, also: str = "") -> RunEnded | None:
        reason = EndReason(agent["reason"])
        if reason is EndReason.FINISHED:
            return None
        message = str(agent["message"]) + (f" (then: {also})" if also else "")
        return RunEnded(_AGENT_OUTCOMES[reason], message)

    # -- verify and policy ----------------------------------------------------------------

    async def _verify(self, run: _Run) -> Output:
        test = run.resolved.config.test
        baseline = run.out(Phase.BASELINE)["report"]
        if test is None or baseline is None:
            verification = nothing_verified(run.resolved.detail)
            return {
                "verification": verification.model_dump(mode="json"),
                "detail": "nothing verified: " + verification.summary,
            }
        verification = await self._verification(run, SuiteReport.model_validate(baseline))
        output = {
            "verification": verification.model_dump(mode="json"),
            "detail": f"{verification.verdict}: {verification.summary}",
        }
        if verification.verdict == "failed":
            await self.store.complete_phase(run.run_id, Phase.VERIFY, output)
            after = verification.after.output_tail if verification.after else ""
            raise RunEnded(
                Outcome.FAILED_TESTS,
                verification.summary,
                partial=run.out(Phase.EXTRACT)["commit"],
                output=after,
            )
        return output

    async def _verification(self, run: _Run, before: SuiteReport) -> Verification:
        test = run.resolved.config.test
        assert test is not None
        mirror, result = self._mirror(run), run.out(Phase.EXTRACT)["commit"]
        changes = [FileChange(s, p) for s, p in await diff_changes(mirror, run.base, result)]
        tests = [c.path for c in changes if is_test_path(c.path)]
        test_diff = await mirror.git("diff", run.base, result, "--", *tests) if tests else ""
        async with contextlib.AsyncExitStack() as stack:
            session = await self._open(stack, run, result)
            self.progress.note("fresh sandbox at the result commit: running the tests")
            after = await run_tests(
                session.client,
                test.command,
                session.repo_dir,
                session.space.env,
                test.timeout_seconds,
            )
            on_base = await self._tests_on_base(session, run.base, result, changes, before, after)
        return judge(before, after, on_base, changes, test_diff)

    async def _tests_on_base(
        self,
        session: Session,
        base: str,
        result: str,
        changes: list[FileChange],
        before: SuiteReport,
        after: SuiteReport,
    ) -> SuiteReport | None:
        """The suite on the old code with only the agent's test files applied."""
        files = [c.path for c in changes if c.status != "D" and is_test_path(c.path)]
        if not files or not (set(after.results) - set(before.results)):
            return None
        ok, output = await session.harness_git("checkout", "-q", "--detach", base)
        if ok:
            ok, output = await session.harness_git("checkout", "-q", result, "--", *files)
        if not ok:
            raise RunEnded(Outcome.SANDBOX_FAULT, f"checking out the old code failed: {output}")
        self.progress.note(f"running the new tests against the old code ({len(files)} file(s))")
        return await run_tests(
            session.client, before.command, session.repo_dir, session.space.env, 900.0
        )

    async def _policy(self, run: _Run) -> Output:
        report = await self._check_policy(run, run.out(Phase.EXTRACT)["commit"])
        output = {
            "report": report.model_dump(mode="json"),
            "detail": "allowed" if report.allowed else "refused",
        }
        if not report.allowed:
            await self.store.complete_phase(run.run_id, Phase.POLICY, output)
            raise RunEnded(Outcome.POLICY, "publishing refused:\n" + report.describe(), policy=True)
        return output

    async def _check_policy(self, run: _Run, commit: str) -> PolicyReport:
        mirror, config = self._mirror(run), run.resolved.config
        changes = [FileChange(s, p) for s, p in await diff_changes(mirror, run.base, commit)]
        diff = await mirror.git("diff", "--no-color", "--no-ext-diff", run.base, commit)
        sizes = await _blob_sizes(mirror, commit, [c.path for c in changes if c.status != "D"])
        violations = [
            *protected_hits(changes, config.all_protected),
            *secret_hits(diff, self.secrets),
            *size_hits(changes, len(diff.encode()), sizes, config.limits),
        ]
        return PolicyReport(violations=violations)

    # -- publish and report ---------------------------------------------------------------

    async def _push(self, run: _Run, commit_ref: str, branch: str) -> None:
        mirror = self._mirror(run)
        url = await self.forge.clone_url()
        await mirror.git(
            "push",
            "--quiet",
            "--force",
            url,
            f"{commit_ref}:refs/heads/{branch}",
            env=credential_env(url, self.forge.credentials()),
        )

    async def _publish(self, run: _Run) -> Output:
        guard, agent = run.out(Phase.GUARD), run.out(Phase.AGENT)
        branch, number = guard["branch"], run.ref.number
        await self._push(run, result_ref(run.run_id), branch)
        description = texts.mr_description(
            issue_number=number,
            summary=agent["summary"],
            diffstat=await self._mirror(run).git(
                "diff", "--stat", run.base, run.out(Phase.EXTRACT)["commit"]
            ),
            verification=Verification.model_validate(run.out(Phase.VERIFY)["verification"]),
            cost=agent["cost"],
            trajectory=agent["trajectory"],
            run_id=run.run_id,
            sandbox=str(run.out(Phase.SETUP).get("sandbox") or ""),
        )
        title = texts.mr_title(number, guard["issue"]["title"])
        existing = await self.forge.find_mr_for_branch(branch)
        if existing is None:
            mr = await self.forge.create_draft_mr(
                NewMergeRequest(
                    source_branch=branch, title=title, description=description, issue=number
                )
            )
        else:
            mr = await self.forge.update_mr(existing, title=title, description=description)
        verb = "updated" if existing else "opened"
        return {
            "branch": branch,
            "mr_number": mr.number,
            "mr_url": mr.web_url,
            "created": existing is None,
            "detail": f"{verb} draft {mr.web_url} from {branch}",
        }

    async def _report(self, run: _Run) -> Output:
        marker = texts.report_marker(run.run_id)
        for earlier in await self.forge.list_comments(run.ref.number):
            if marker in earlier.body:  # posted before an interruption: do not post twice
                return {"comment_id": earlier.id, "detail": "had commented on the issue"}
        verification = Verification.model_validate(run.out(Phase.VERIFY)["verification"])
        body = texts.success_comment(
            run.out(Phase.PUBLISH)["mr_url"],
            verification,
            run.out(Phase.AGENT)["cost"],
            run.run_id,
        )
        comment = await self.forge.add_comment(run.ref.number, body)
        return {"comment_id": comment.id, "detail": "commented on the issue"}

    async def _push_partial(self, run: _Run, end: RunEnded) -> str | None:
        partial = end.details.get("partial")
        if not partial or end.outcome is Outcome.POLICY or Phase.GUARD not in run.outputs:
            return None
        try:
            report = await self._check_policy(run, str(partial))
            if not report.allowed:
                end.details["output"] = "partial work not pushed:\n" + report.describe()
                return None
            branch = str(run.out(Phase.GUARD)["branch"])
            await self._push(run, str(partial), branch)
        except (ForgeError, GitError) as exc:
            self.progress.note(f"could not push the partial work: {exc}")
            return None
        return branch

    async def _comment_failure(self, run: _Run, end: RunEnded, branch: str | None) -> None:
        if end.details.get("comment") is False:
            return
        body = texts.failure_comment(
            end.outcome.value, end.message, str(end.details.get("output", "")), branch, run.run_id
        )
        try:
            await self.forge.add_comment(run.ref.number, Masker(self.secrets).mask_text(body))
        except ForgeError as exc:
            self.progress.note(f"could not comment on the issue: {exc}")


def _agent_output(result: AgentResult, trajectory: Path) -> Output:
    tokens = total_tokens(result.usage)
    cost = f"${result.usage.cost_usd:.4f} ({tokens} tokens, {result.steps} model calls)"
    return {
        "reason": result.reason.value,
        "message": result.message,
        "summary": result.summary,
        "steps": result.steps,
        "tokens": tokens,
        "cost_usd": result.usage.cost_usd,
        "cost": cost,
        "elapsed_s": round(result.elapsed_s, 3),
        "trajectory": str(trajectory),
        "detail": f"{result.reason.value} after {result.steps} model calls, {cost}",
    }


async def _blob_sizes(mirror: Mirror, commit: str, paths: list[str]) -> dict[str, int]:
    if not paths:
        return {}
    out = await mirror.git("ls-tree", "-l", commit, "--", *paths)
    sizes = {}
    for line in out.splitlines():
        meta, _, path = line.partition("\t")
        size = meta.split()[-1]
        sizes[path] = int(size) if size.isdigit() else 0
    return sizes


def _classify(exc: Exception) -> RunEnded | None:
    """Our own errors as run endings; anything else is a bug and propagates."""
    if isinstance(exc, ForgeError):
        return RunEnded(Outcome.FORGE_ERROR, f"the forge failed: {exc}")
    if isinstance(exc, RepoConfigError):
        return RunEnded(Outcome.CONFIG_ERROR, str(exc))
    if isinstance(exc, WorkspaceError | RunnerError):
        return RunEnded(Outcome.SANDBOX_FAULT, f"the sandbox failed: {exc}")
    if isinstance(exc, GitError):
        return RunEnded(Outcome.FORGE_ERROR, f"a git operation failed: {exc}")
    from forgehand.sandbox.errors import SandboxError

    if isinstance(exc, SandboxError):
        return RunEnded(Outcome.SANDBOX_FAULT, f"the sandbox failed: {exc}")
    return None
