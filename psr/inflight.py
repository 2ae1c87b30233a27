"""The in-flight search driver (issue 30): every problem of a rank in flight, each advancing as soon as its own
candidates or judgments come back, instead of chunks that advance one phase at a time.

Pieces:
- ``request_seed``: every sampled completion's seed from (run seed, problem, step, attempt, candidate), so a
  problem's trace does not depend on what it was batched with, on the engine's scheduling or on the sharding.
- ``take_step``: PSR's step logic for one problem (tie rule, rollbacks, the oracle's all-right rule, stops),
  shared with the lockstep ``psr.search.search_chunk``; it writes the events exactly as that always has, so
  ``psr.pairs`` and the report read both drivers' traces alike.
- ``ProblemSearch``: one problem's state machine: ``candidates`` (wants its ``width`` next-step candidates)
  -> ``judging`` (wants its step's ordered comparisons) -> ``take_step`` -> ``candidates`` or ``done``.
- ``InflightSearch``: the scheduler. It pulls units of problems (the unit of saving and resuming) from a
  source as room frees up, keeps up to ``cfg.inflight`` problems in flight, and hands a unit's traces to
  ``on_unit`` once all its problems are done.
  - vLLM: a request queue kept full: every ready request goes into the engine at once (``n=1`` requests with
    their own seeds; the judge's verdict-letter log-probabilities as one-token requests; the likelihood
    self-judge's candidate rows as prompt-log-probability requests), and each engine
    step's finished requests move their problems on (vLLM's continuous batching does the rest).
  - HF: ``generate`` is synchronous, so the driver batches whatever is ready: the next ``batch_size``
    candidate sequences from the problems waiting longest, then every pending judgment; each row samples
    from its own seeded generator (``psr.generation.PerRowSampler``).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import permutations

import torch

from psr.answers import extract_answer
from psr.judge import Comparison, truth_comparison
from psr.steps import has_final_answer, render_prompt


def mix_seed(*parts) -> int:
    """A 62-bit seed from any parts (stable across processes and Python versions, unlike ``hash``)."""
    digest = hashlib.blake2b("\x1f".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


def request_seed(run_seed: int, problem_id: str, step: int, attempt: int, candidate: int) -> int:
    """The seed of one candidate: ``attempt`` counts the problem's proposals so far (a rolled-back step is
    proposed again under a new attempt), ``step`` is the path's length when it was proposed."""
    return mix_seed("psr-candidate", run_seed, problem_id, step, attempt, candidate)


def unanimous(cands: list[str]) -> bool:
    """Every candidate is the same step (nothing for a judge to tell apart)."""
    return len({c.strip() for c in cands}) == 1


def take_step(s: dict, cands: list[str], right: list, comp: Comparison, max_rollbacks: int, max_steps: int,
              oracle: bool, keep_unanimous: bool = False) -> bool:
    """Apply one judged step to problem state ``s`` (``path``, ``events``, ``rollbacks``, ``status``): record its
    event, then keep the best candidate, roll back on a tie, or stop. True while the problem goes on."""
    event = {
        "step_index": len(s["path"]), "previous_steps": list(s["path"]), "candidates": cands,
        "candidate_correct": right, "judgments": comp.order_scores, "scores": comp.scores,
        "order_disagreements": comp.disagreements, "unparseable": comp.unparseable,
        **({"judge_elided_steps": comp.elided} if comp.elided else {}),  # left out to fit the context
        **({"judge_too_long": True} if comp.too_long else {}),  # not judged at all: no preference
    }
    s["events"].append(event)
    if oracle and all(r is True for r in right):
        # Oracle, every candidate right: any will do. Keep the first, learn nothing (no worst,
        # no pair); the tie rule below is for a judge that cannot tell right from wrong.
        best, worst = 0, None
    elif keep_unanimous and unanimous(cands):
        best, worst = 0, None  # one step written every time: nothing to judge, and no reason to resample before it
        event["unanimous"] = True
    elif max(comp.scores) == min(comp.scores):  # the judge cannot separate them: roll back
        event["tie"] = True
        s["rollbacks"] += 1
        if s["rollbacks"] > max_rollbacks:
            s["status"] = "gave_up"  # stop here; the steps kept so far (and their pairs) stand
            return False
        if s["path"]:
            s["path"].pop()
            kept = [e for e in s["events"] if e.get("kept")]
            kept[-1]["kept"] = False
            kept[-1]["rolled_back"] = True
        return True
    else:
        best = max(range(len(cands)), key=lambda i: (comp.scores[i], -i))
        worst = min(range(len(cands)), key=lambda i: (comp.scores[i], i))
    event.update(tie=False, best=best, worst=worst, kept=True)
    s["path"].append(cands[best])
    if has_final_answer(cands[best]):
        s["status"] = "answered"
    elif not cands[best].strip():
        s["status"] = "empty_step"
    elif len(s["path"]) >= max_steps:
        s["status"] = "max_steps"
    else:
        return True
    return False


def make_trace(s: dict, task, method: str) -> dict:
    """One problem's saved trace (the fields ``search.jsonl`` has always had)."""
    p = s["problem"]
    solution = "\n".join(s["path"])
    return {
        "problem_id": p.id, "question": p.question, "gold": p.gold, "method": method,
        "difficulty": task.difficulty(p), "status": s["status"], "rollbacks": s["rollbacks"],
        "path": s["path"], "final_answer": extract_answer(solution) if s["path"] else None,
        "final_correct": bool(s["path"]) and task.check_answer(p, solution),
        "events": s["events"],
    }


class InFlight:
    """The problems in flight, by unit (the unit of saving and resuming), for a driver whose problems each
    advance on their own (``InflightSearch``; build-eft's ``InflightEFT``): units are pulled from a source as
    room frees up, and a unit comes back whole once all its problems are done. ``tick`` orders the problems'
    phases (HF serves the longest-waiting first)."""

    def __init__(self, limit: int, progress=None):
        self.limit, self.progress = max(limit, 1), progress
        self.live: list = []
        self.units: dict = {}  # unit -> its problems, in the unit's order
        self.clock = 0

    def tick(self) -> int:
        self.clock += 1
        return self.clock

    def refill(self, source: Iterator, make: Callable, start: Callable) -> None:
        """Pull ``(unit, problems)`` from ``source`` while there is room; ``make(problem, unit)`` builds a problem's
        state and ``start`` sets each going (it may finish one at once, which frees room)."""
        while len(self.live) < self.limit and (item := next(source, None)) is not None:
            unit, problems = item
            members = [make(p, unit) for p in problems]
            self.units[unit] = members
            self.live += members
            for m in members:
                start(m)

    def finish(self, member) -> list | None:
        """Mark ``member`` done; its unit's members once they are all done, else None."""
        member.phase = "done"
        self.live.remove(member)
        if self.progress is not None:
            self.progress.update(1)
        members = self.units[member.unit]
        if any(m.phase != "done" for m in members):
            return None
        del self.units[member.unit]
        return members


@dataclass
class ProblemSearch:
    """One problem in flight."""

    problem: object
    unit: object
    state: dict = field(default_factory=dict)  # path, events, rollbacks, status (take_step's view)
    phase: str = "candidates"  # candidates -> judging -> candidates ... -> done
    ready_at: int = 0  # when it entered its phase (the HF scheduler serves the longest-waiting first)
    cands: list = field(default_factory=list)
    right: list = field(default_factory=list)
    values: dict = field(default_factory=dict)  # (i, j) -> judge value, as the comparisons come back
    got: int = 0  # candidates back so far
    elided: int | None = 0  # earlier steps left out of this step's judge prompts (None: not judged, too long)

    def __post_init__(self):
        self.state = {"problem": self.problem, "path": [], "events": [], "rollbacks": 0, "status": None}

    def seeds(self, cfg) -> list[int]:
        step, attempt = len(self.state["path"]), len(self.state["events"])
        return [request_seed(cfg.seed, self.problem.id, step, attempt, k) for k in range(cfg.width)]


class InflightSearch:
    """PSR search with every problem in flight (module docstring). ``judge``: a ``StepJudge`` on the same model,
    or None for the oracle (the task's exact step check)."""

    def __init__(self, model, tokenizer, task, judge, cfg, on_unit: Callable | None = None, progress=None):
        self.model, self.tok, self.task, self.judge, self.cfg = model, tokenizer, task, judge, cfg
        self.on_unit = on_unit or (lambda unit, traces: None)
        self.pool = InFlight(getattr(cfg, "inflight", 64), progress)
        self.live = self.pool.live  # the pool's list: the loops below read it
        self.stats = {"candidate_requests": 0, "judge_requests": 0}

    # -- units ----------------------------------------------------------------------------------------
    def _refill(self, source: Iterator) -> None:
        self.pool.refill(source, lambda p, unit: ProblemSearch(p, unit, ready_at=self._tick()), self._want_candidates)

    def _tick(self) -> int:
        return self.pool.tick()

    def _finish(self, ps: ProblemSearch) -> None:
        members = self.pool.finish(ps)
        if members is not None:
            self.on_unit(ps.unit, [make_trace(m.state, self.task, "psr") for m in members])

    # -- the step logic's transitions ----------------------------------------------------------------
    def _want_candidates(self, ps: ProblemSearch) -> None:
        ps.phase, ps.ready_at, ps.cands, ps.got, ps.values = "candidates", self._tick(), [None] * self.cfg.width, 0, {}
        ps.elided = 0
        self._submit_candidates(ps)

    def _got_candidates(self, ps: ProblemSearch) -> None:
        s = ps.state
        ps.right = [self.task.check_step(ps.problem, s["path"], c) for c in ps.cands]
        if self.judge is None:
            self._judged(ps, truth_comparison(ps.right))
            return
        ps.phase, ps.ready_at = "judging", self._tick()
        self._submit_judgments(ps)

    def _judged(self, ps: ProblemSearch, comp: Comparison) -> None:
        goes_on = take_step(ps.state, list(ps.cands), ps.right, comp, self.cfg.max_rollbacks, self.cfg.max_steps,
                            oracle=self.judge is None, keep_unanimous=self.cfg.keep_unanimous)
        if goes_on:
            self._want_candidates(ps)
        else:
            self._finish(ps)

    def _aggregate(self, ps: ProblemSearch) -> Comparison:
        too_long = ps.elided is None
        orders = [] if too_long else list(permutations(range(len(ps.cands)), 2))
        logits = self.judge.cfg.mode == "logits"
        comp = self.judge._aggregate(len(ps.cands), orders, [ps.values[o] for o in orders], logits)
        comp.elided, comp.too_long = ps.elided or 0, too_long
        return comp

    # -- engines -------------------------------------------------------------------------------------
    @property
    def on_vllm(self) -> bool:
        return getattr(self.model, "is_vllm_engine", False)

    def _submit_candidates(self, ps: ProblemSearch) -> None:
        if not self.on_vllm:
            return  # the HF loop collects the problems in phase "candidates"
        prompt = self.tok(render_prompt(self.tok, ps.problem.question, ps.state["path"]),
                          add_special_tokens=False)["input_ids"]
        if len(prompt) + self.cfg.max_step_tokens > self.model.max_len:  # no room for a whole step (psr.lengths)
            ps.state["status"] = "too_long"
            self._finish(ps)
            return
        n = len(ps.state["events"])
        for k, seed in enumerate(ps.seeds(self.cfg)):
            params = self.model.sample_params(self.cfg.sampling, self.cfg.max_step_tokens, seed, "step")
            self._add(f"c|{ps.problem.id}|{n}|{k}", prompt, params, (ps, "c", k))
        self.stats["candidate_requests"] += self.cfg.width

    def _submit_judgments(self, ps: ProblemSearch) -> None:
        if not self.on_vllm:
            return
        if self.judge.cfg.mode == "likelihood":
            self._submit_likelihoods(ps)
            return
        logits = self.judge.cfg.mode == "logits"
        q, path = ps.problem.question, ps.state["path"]
        n = len(ps.state["events"])
        # earlier steps left out until every comparison fits the context, or the step not judged (psr.lengths)
        ps.elided = self.judge.fit_previous(q, path, ps.cands, logits)
        if ps.elided is None:
            self._judged(ps, self._aggregate(ps))
            return
        if ps.elided:
            from psr.judge import elision_note

            path = [elision_note(ps.elided)] + list(path[ps.elided :])
        if logits:
            params = self.model.choice_params(self.judge.choice_ids)
        else:
            from psr.sampling import SamplingConfig

            params = self.model.sample_params(SamplingConfig(policy="greedy"), self.judge.cfg.max_new_tokens,
                                              None, None)
        for i, j in permutations(range(len(ps.cands)), 2):
            prompt = self.judge.prompt(q, path, ps.cands[i], ps.cands[j], logits)
            self._add(f"j|{ps.problem.id}|{n}|{i},{j}", self.tok(prompt, add_special_tokens=False)["input_ids"],
                      params, (ps, "j", (i, j)))
            self.stats["judge_requests"] += 1

    def _submit_likelihoods(self, ps: ProblemSearch) -> None:
        """The likelihood self-judge (psr.self_judges): one prompt-log-probability request per candidate, the
        row that ``candidate_loglik`` reads; a row too long for the context scores -inf, as there."""
        from psr.judge_own import _head_and_tails

        step = {"question": ps.problem.question, "previous_steps": ps.state["path"], "candidates": ps.cands}
        head, tails = _head_and_tails(self.tok, step)
        n = len(ps.state["events"])
        for k, tail in enumerate(tails):
            if not tail:
                ps.values[k] = 0.0
            elif len(head) + len(tail) + 1 > self.model.max_len:
                ps.values[k] = float("-inf")
            else:
                self._add(f"l|{ps.problem.id}|{n}|{k}", head + tail, self.model.prompt_logprob_params(),
                          (ps, "l", (k, len(head), len(tail))))
                self.stats["judge_requests"] += 1
        if len(ps.values) == len(ps.cands):  # nothing was sent
            self._judged(ps, self._likelihood_comparison(ps))

    def _likelihood_comparison(self, ps: ProblemSearch) -> Comparison:
        from psr.self_judges import likelihood_comparison

        return likelihood_comparison([ps.values[k] for k in range(len(ps.cands))], ps.cands, self.judge.cfg.tie_margin)

    def _add(self, rid: str, prompt_ids, params, route) -> None:
        self.routes[rid] = route
        self.model.add_request(rid, prompt_ids, params)

    def _deliver(self, out) -> None:
        from psr.generation import cut_at_step_boundary

        ps, kind, key = self.routes.pop(out.request_id)
        if kind == "c":
            ps.cands[key] = cut_at_step_boundary(out.outputs[0].text).strip()
            ps.got += 1
            if ps.got == self.cfg.width:
                self._got_candidates(ps)
            return
        if kind == "l":  # a candidate's reduced log-probability, as candidate_loglik reads it
            from psr.judge_own import reduce_logprobs

            k, start, length = key
            ps.values[k] = reduce_logprobs(self.model.own_logprobs(out, start, length),
                                           self.judge.cfg.likelihood_reduction)
            if len(ps.values) == len(ps.cands):
                self._judged(ps, self._likelihood_comparison(ps))
            return
        if self.judge.cfg.mode == "logits":
            lp = out.outputs[0].logprobs[0]
            probs = torch.softmax(torch.tensor([lp[t].logprob for t in self.judge.choice_ids], dtype=torch.float32), -1)
            ps.values[key] = float(probs[0])
        else:
            ps.values[key] = out.outputs[0].text.strip()
        if len(ps.values) == len(ps.cands) * (len(ps.cands) - 1):
            self._judged(ps, self._aggregate(ps))

    # -- the loops -----------------------------------------------------------------------------------
    def run(self, source: Iterator) -> None:
        """Search every unit ``source`` yields (``(unit, problems)``), in flight; ``on_unit`` gets each unit's
        traces when its last problem is done."""
        source = iter(source)
        self.routes: dict = {}
        if self.on_vllm:
            self._refill(source)
            while self.live:
                for out in self.model.step():
                    self._deliver(out)
                self._refill(source)
        else:
            self._run_hf(source)

    def _run_hf(self, source: Iterator) -> None:
        from psr.generation import generate

        cfg = self.cfg
        per_batch = max(1, cfg.batch_size // cfg.width)
        self._refill(source)
        while self.live:
            waiting = sorted((p for p in self.live if p.phase == "candidates"), key=lambda p: p.ready_at)
            if waiting:
                from psr.lengths import fits

                batch = waiting[:per_batch]
                prompts = [render_prompt(self.tok, p.problem.question, p.state["path"]) for p in batch]
                ok = fits(self.model, self.tok, prompts, cfg.max_step_tokens)
                for p in [p for p, k in zip(batch, ok) if not k]:  # no room for a whole step (psr.lengths)
                    p.state["status"] = "too_long"
                    self._finish(p)
                batch, prompts = [p for p, k in zip(batch, ok) if k], [q for q, k in zip(prompts, ok) if k]
                outs = generate(self.model, self.tok, prompts, cfg.sampling, cfg.max_step_tokens, cfg.batch_size,
                                num_samples=cfg.width, stop_at_step=True, progress=False,
                                seeds=[p.seeds(cfg) for p in batch])
                self.stats["candidate_requests"] += cfg.width * len(batch)
                for p, cands in zip(batch, outs):
                    p.cands = list(cands)
                    self._got_candidates(p)
            judging = [p for p in self.live if p.phase == "judging"]
            if judging:
                comps = self.judge.compare([(p.problem.question, p.state["path"], p.cands) for p in judging])
                self.stats["judge_requests"] += sum(len(p.cands) * (len(p.cands) - 1) for p in judging)
                for p, comp in zip(judging, comps):
                    self._judged(p, comp)
            self._refill(source)


def search_inflight(problems, task, model, tokenizer, judge, cfg, unit_size: int | None = None) -> list[dict]:
    """Every problem's trace, in the order of ``problems`` (a convenience around ``InflightSearch``)."""
    unit_size = unit_size or len(problems) or 1
    units = [(u, problems[i : i + unit_size]) for u, i in enumerate(range(0, len(problems), unit_size))]
    done: dict = {}
    InflightSearch(model, tokenizer, task, judge, cfg, on_unit=lambda u, t: done.__setitem__(u, t)).run(units)
    return [t for u, _ in units for t in done[u]]


def claimed_units(chunks, todo: list[int], chunk_dir, nonce: str, rank: int, world: int) -> Iterator:
    """``(c, chunks[c])`` for the chunks this rank takes, as it has room for them. One rank: every chunk of
    ``todo``. Several: a chunk goes to the rank that first creates its claim file (``O_EXCL``) in
    ``claims.<nonce>``, a fresh folder each run (a killed run's claims never hold back its resumption); each
    rank tries its round-robin share first, then takes what the others have not, so a fast rank helps a slow
    one instead of waiting for it at the barrier."""
    claims = chunk_dir / f"claims.{nonce}"
    claims.mkdir(parents=True, exist_ok=True)
    order = [c for c in todo if c % world == rank] + [c for c in todo if c % world != rank]
    for c in order:
        if world > 1:
            try:
                os.close(os.open(claims / f"{c:05d}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                continue
        yield c, chunks[c]


def search_units(model, tokenizer, task, judge, cfg, chunks, todo, chunk_dir, nonce, world, progress=None):
    """The in-flight search of ``run_search``: chunks taken as room frees up (``claimed_units``), each saved as
    ``chunk_dir/NNNNN.jsonl`` once all its problems are done. Returns the chunks this rank searched."""
    from psr.distributed import context
    from psr.files import write_jsonl_atomic

    rank = context()[0]
    searched = []

    def save(c, traces):
        write_jsonl_atomic(chunk_dir / f"{c:05d}.jsonl", traces)
        searched.append(c)

    InflightSearch(model, tokenizer, task, judge, cfg, on_unit=save, progress=progress).run(
        claimed_units(chunks, todo, chunk_dir, nonce, rank, world))
    return searched
