"""Pacing of one server account: what the user set, and what the relay taught us.

A Pacer decides when the next transaction on a server may start (`next_start`),
how many sessions may be open (`effective_connections`) and how many messages a
session may carry (`messages_per_connection`). It is pure logic on a clock passed
in, so it can be tested without a relay. The supervisor asks it before handing a
recipient to a worker, which is the one place every server's traffic passes.

Every relay reply comes in once, through `on_reply(stage, code, text)`: the pacer's
Classifier reads it with its stage (classify.py) and the pacer acts on the limit it
names. Signals it learns from, and what each does:
  too many sessions -> halve the effective connections (never below 1; a refusal within
                       `clean_period` of a raise undoes only that raise); +1 again after
                       `clean_period` without that signal (never above `connections`)
  session length    -> the same count of messages twice before a drop: rotate at it
  rate              -> slow down to 70 % of the recent rate, pause briefly
  quota             -> park until the quota window reopens, or an exponential cool-off
Group/Interval (group_size messages, then every session pauses group_interval) is
counted here on one host; on several hosts the account's groups are counted in the
journal for every host, and the pacer spends the turns its host was granted
(grant_turns, needs_turns).
What was learned is a msgspec Struct (schema/records.py Learned) the journal stores
per server.
"""

from __future__ import annotations

import collections
import math
from typing import NamedTuple

from mailerd.pacing.classify import Cause, Classifier, Scope, Verdict, retry_hint, window_hint
from mailerd.schema.config import PatternConfig, Rate, ServerConfig, parse_rate
from mailerd.schema.records import Learned

HOUR = 3600.0
DAY = 86400.0
RATE_BACKOFF = 0.7
RATE_RECOVERY = 1.1
RATE_PAUSE = 5.0  # seconds of silence after a rate refusal without a hint
SAME_LENGTH_TO_LEARN = 2
SESSIONS_SIGNAL_GUARD = 1.0  # seconds: one halving per burst of "too many sessions"
# Seconds a turn of the account's shared group stays usable after it was asked for. The
# pause after a full group is this much longer than group_interval, so a turn used late
# still leaves the relay a whole interval of silence before the next group.
TURN_TTL = 0.5


class Decision(NamedTuple):
    """A pacing decision, for the log: what changed, why, and the relay's words."""

    action: str
    cause: str
    detail: str
    reply: str | None = None


class Reaction(NamedTuple):
    """A relay's reply as the pacer took it: how it was read, and what changed (if anything)."""

    verdict: Verdict
    decision: Decision | None


_NOT_CHARGED = "not the recipient's fault: no attempt counted, it goes back to the queue " \
    "(another server of the campaign may take it)"
_LIMIT_ACTIONS = {
    Cause.SESSIONS: "halve this server's sessions (never below 1; a refusal right after a raise "
                    "undoes only that raise), one more after each clean_period without refusals",
    Cause.RATE: "slow this server to 70 % of its recent rate and pause ({pause}), "
                "10 % faster after each clean_period without refusals",
    Cause.QUOTA: "park this server until the {window} reopens (counted from the journal's send "
                 "times), else for quota_cooloff, doubling; it resumes by itself",
    Cause.SESSION_LENGTH: "learn how many messages a session carries here and close sessions "
                          "after that many",
}


def action_for(verdict: Verdict, reply: str) -> str:
    """What mailerd does on a reply read as `verdict` (for `mailerctl explain`)."""
    if verdict.scope is Scope.NONE:
        return "nothing: not a refusal"
    if verdict.scope is Scope.RECIPIENT:
        if verdict.code is not None and verdict.code >= 500:
            return "fail this recipient, keeping the reply (and suppress it if it matches " \
                   "bounce_patterns)"
        return "defer this recipient: an attempt counted, retried after retry_initial " \
               "(doubling up to retry_max), failed after max_attempts"
    if verdict.cause is None:
        return f"{_NOT_CHARGED}; the session is closed, and its drops are learned from"
    hint = retry_hint(reply)
    window = {DAY: "day", HOUR: "hour"}.get(window_hint(reply) or 0.0, "quota window")
    action = _LIMIT_ACTIONS[verdict.cause].format(
        pause=f"{hint:g}s, the relay's hint" if hint else f"{RATE_PAUSE:g}s", window=window)
    return f"{_NOT_CHARGED}; {action}"


def count_since(times: collections.deque[float], since: float) -> int:
    """How many of the (sorted) times are at or after `since`."""
    count = 0
    for t in reversed(times):
        if t < since:
            break
        count += 1
    return count


def forget_before(times: collections.deque[float], since: float) -> None:
    while times and times[0] < since:
        times.popleft()


def window_rate(times: collections.deque[float], now: float, window: float) -> float:
    """Events per second over the last `window` (or since the first in it); 0 until two."""
    count = count_since(times, now - window)
    if count < 2:
        return 0.0
    return count / max(now - times[len(times) - count], 1.0)


class Pacer:
    def __init__(self, name: str, server: ServerConfig, learned: Learned | None = None,
                 sends: list[float] | None = None,
                 patterns: PatternConfig | None = None) -> None:
        self.name = name
        self.configure(server)
        self.classifier = Classifier(patterns)
        self.learned = learned or Learned()
        self.starts: collections.deque[float] = collections.deque(sorted(sends or []))
        self.group_count = 0
        self.paused_until: float | None = None
        self.pause_reason: str | None = None
        self.last_sessions_signal = 0.0
        self.last_decrease = -math.inf  # one halving per burst of "too many sessions"
        self.last_raise = -math.inf  # a refusal soon after a raise undoes just that raise
        self.last_rate_signal = 0.0
        self.session_ends: collections.deque[int] = collections.deque(maxlen=SAME_LENGTH_TO_LEARN)
        self.changed = False  # learned state needs saving
        # several hosts on one journal (supervisor/cluster.py): the account's rate is shared
        # by the live hosts, each sends its part; and a host that has just joined sends
        # nothing paced by a rate until the others have seen it (not_before)
        self.hosts = 1
        self.not_before = 0.0
        self.starts_shared = False  # `starts` holds every host's sends (for the quotas)
        # Group/Interval counted for every host (cluster.py): the turns of the account's
        # current group this host holds, until when, and the pause its grant began
        self.shared_groups = False
        self.turns = 0
        self.turns_expire = 0.0
        self.pause_after_turns: float | None = None

    # ------------------------------------------------------------ settings

    def configure(self, server: ServerConfig) -> None:
        self.server = server
        self.rate: Rate | None = parse_rate(server.rate) if server.rate else None  # parsed once, used per message

    def set_patterns(self, patterns: PatternConfig) -> None:
        self.classifier = Classifier(patterns)

    def account_rate(self) -> float | None:
        """The account's messages per second: the lower of the set and the learned rate."""
        rates = [r for r in (self.rate and self.rate.per_second, self.learned.rate) if r]
        return min(rates) if rates else None

    def effective_rate(self) -> float | None:
        """Messages per second this host may send now: its part of the account's rate."""
        rate = self.account_rate()
        return rate / self.hosts if rate else None

    def effective_connections(self) -> int:
        learned = self.learned.connections
        return max(1, min(self.server.connections, learned or self.server.connections))

    def messages_per_connection(self) -> int:
        limits = [n for n in (self.server.messages_per_connection,
                              self.learned.messages_per_connection) if n]
        return min(limits) if limits else 0

    def quotas(self) -> list[tuple[int, float]]:
        """(limit, window seconds) pairs in force."""
        result = []
        for configured, learned, window in (
            (self.server.hourly_quota, self.learned.hourly_quota, HOUR),
            (self.server.daily_quota, self.learned.daily_quota, DAY),
        ):
            limits = [n for n in (configured, learned) if n]
            if limits:
                result.append((min(limits), window))
        return result

    # ------------------------------------------------------------ the gate

    def next_start(self, now: float) -> float:
        """Earliest time the next transaction may start (<= now: at once)."""
        forget_before(self.starts, now - DAY)
        times = [now]
        if self.learned.parked_until:
            times.append(self.learned.parked_until)
        if self.paused_until:
            times.append(self.paused_until)
        rate = self.effective_rate()
        if rate and self.not_before > now:
            times.append(self.not_before)
        if rate and self.starts:
            times.append(self.starts[-1] + 1.0 / rate)
        configured = self.rate
        if configured and len(self.starts) >= configured.count:
            # over this host's own starts, its part; over every host's, the account's
            per = configured.per if self.starts_shared else configured.per * self.hosts
            times.append(self.starts[-int(configured.count)] + per)
        times.extend(reopens for _, _, reopens in self._quotas_reached(now))
        return max(times)

    def _quotas_reached(self, now: float) -> list[tuple[int, float, float]]:
        """(limit, window, when it reopens) for each quota used up at `now`."""
        reached = []
        for limit, window in self.quotas():
            # the cheap test first: this runs for every message handed out
            if len(self.starts) >= limit and self.starts[-limit] >= now - window:
                inside = count_since(self.starts, now - window)
                reached.append((limit, window, self.starts[len(self.starts) - inside] + window))
        return reached

    def take(self, now: float) -> Decision | None:
        """Record one transaction start; returns a decision when a group pause begins."""
        self.starts.append(now)
        if not self.grouped():
            return None
        if self.shared_groups:
            return self._use_turn(now)
        self.group_count += 1
        if self.group_count >= self.server.group_size:
            self.group_count = 0
            return self._group_pause(now, self.server.group_interval)
        return None

    def grouped(self) -> bool:
        return bool(self.server.group_size and self.server.group_interval)

    def _group_pause(self, now: float, seconds: float) -> Decision:
        self.paused_until = now + seconds
        self.pause_reason = f"group of {self.server.group_size} sent"
        return Decision("pause", "group", f"for {round(seconds, 1):g}s")

    # ------------------------------------------------------------ the group, several hosts

    def needs_turns(self, now: float) -> bool:
        """Several hosts: this host holds no usable turn of the account's group, so it may
        start nothing before it is granted some. Always False on one host."""
        if not (self.shared_groups and self.grouped()):
            return False
        if self.turns and now < self.turns_expire:
            return False
        self.turns, self.pause_after_turns = 0, None  # too late: lost (the account sees fewer)
        return True

    def grant_turns(self, granted: int, pause_left: float, asked_at: float,
                    now: float) -> Decision | None:
        """The journal's answer to an ask made at `asked_at`: `granted` turns, usable for
        TURN_TTL from the ask, and the seconds of the group's pause left. A pause another
        host's grant began applies now; one this grant began, once its turns are used."""
        self.turns, self.turns_expire = granted, asked_at + TURN_TTL
        self.pause_after_turns = None
        if pause_left <= 0:
            return None
        if granted:
            self.pause_after_turns = now + pause_left
            return None
        return self._group_pause(now, pause_left)

    def _use_turn(self, now: float) -> Decision | None:
        self.turns = max(0, self.turns - 1)
        if self.turns or self.pause_after_turns is None:
            return None
        until, self.pause_after_turns = self.pause_after_turns, None
        return self._group_pause(now, max(0.0, until - now))

    def recent_rate(self, now: float, window: float = 60.0) -> float:
        """Starts per second over the last `window` (or since the first start in it)."""
        return window_rate(self.starts, now, window)

    # ------------------------------------------------------------ learning

    def tick(self, now: float) -> list[Decision]:
        """Time-based recovery: unpark, unpause, regain connections and rate."""
        decisions = []
        if self.learned.parked_until and now >= self.learned.parked_until:
            self.learned.parked_until = None
            self.learned.park_reason = None
            self.changed = True
            decisions.append(Decision("resume", "quota", "park ended"))
        if self.paused_until and now >= self.paused_until:
            self.paused_until = None
            self.pause_reason = None
        clean = self.server.clean_period
        learned = self.learned.connections
        if learned and now - self.last_sessions_signal >= clean:
            self.learned.connections = learned + 1 if learned + 1 < self.server.connections else None
            self.last_sessions_signal = self.last_raise = now
            self.changed = True
            decisions.append(Decision("raise", "too many sessions",
                                      f"connections {self.effective_connections()}"))
        if self.learned.rate and now - self.last_rate_signal >= clean:
            self.learned.rate *= RATE_RECOVERY
            self.last_rate_signal = now
            configured = self.rate
            if configured and self.learned.rate >= configured.per_second:
                self.learned.rate = None
            self.changed = True
            decisions.append(Decision("speed up", "rate", self._rate_text()))
        return decisions

    def on_reply(self, stage: str, code: int | None, text: str, now: float) -> Reaction:
        """The one entry for a relay's reply: classify it by stage and words, act on a limit."""
        verdict = self.classifier.classify(stage, code, text)
        decision = None
        if verdict.cause is not None:
            reply = text if code is None or text.startswith(str(code)) else f"{code} {text}"
            decision = self.on_refusal(verdict.cause, reply, now)
        return Reaction(verdict, decision)

    def on_refusal(self, cause: Cause, reply: str, now: float) -> Decision | None:
        """What a refusal of this cause changes; None for a repeat of a burst just acted on."""
        if cause is Cause.SESSIONS:
            if now - self.last_decrease < SESSIONS_SIGNAL_GUARD:
                return None
            return self.on_too_many_sessions(reply, now)
        if cause is Cause.RATE:
            return self._slow_down(reply, now)
        if cause is Cause.QUOTA:
            return self._park(reply, now)
        return self._learn_length_from_text(reply)

    def on_too_many_sessions(self, reply: str, now: float) -> Decision:
        current = self.effective_connections()
        probing = now - self.last_raise < self.server.clean_period
        self.learned.connections = max(1, current - 1 if probing else current // 2)
        self.last_raise = -math.inf
        self.last_sessions_signal = self.last_decrease = now
        self.changed = True
        return Decision("lower", "too many sessions",
                        f"connections {current} -> {self.effective_connections()}", reply)

    def _slow_down(self, reply: str, now: float) -> Decision:
        if self.paused_until and self.paused_until > now and self.pause_reason == "rate refusal":
            return Decision("note", "rate", "already slowed down", reply)
        # learned for the account: this host saw its part of it
        recent = self.recent_rate(now, 60.0) * self.hosts or self.account_rate() or 1.0
        current = self.account_rate() or recent
        self.learned.rate = max(min(current, recent) * RATE_BACKOFF, 1.0 / 60)
        self.last_rate_signal = now
        pause = retry_hint(reply) or RATE_PAUSE
        self.paused_until = max(self.paused_until or 0, now + pause)
        self.pause_reason = "rate refusal"
        self.changed = True
        return Decision("slow down", "rate", f"{self._rate_text()}, pause {pause:g}s", reply)

    def _park(self, reply: str, now: float) -> Decision:
        if self.learned.parked_until and self.learned.parked_until > now:
            return Decision("note", "quota", "already parked", reply)
        window = window_hint(reply)
        until = None
        if window:
            sent = count_since(self.starts, now - window)
            if sent:
                if window == DAY:
                    self.learned.daily_quota = sent
                else:
                    self.learned.hourly_quota = sent
                until = self.starts[len(self.starts) - sent] + window
        if until is None or until <= now:
            self.learned.cooloffs += 1
            delay = min(self.server.quota_cooloff * 2 ** (self.learned.cooloffs - 1), DAY)
            until = now + delay
        self.learned.parked_until = until
        self.learned.park_reason = reply
        self.changed = True
        return Decision("park", "quota", f"until {until:.0f} ({until - now:.0f}s)", reply)

    def _learn_length_from_text(self, reply: str) -> Decision:
        # the count is learned when the session's end reports it (learn_session_length)
        return Decision("note", "session length", "reply names a session limit", reply)

    def on_session_end(self, messages: int, dropped: bool, reply: str, now: float,
                       other_sessions_alive: bool) -> Decision | None:
        """A session ended. Drops tell us about session length or session count."""
        if not dropped:
            self.learned.cooloffs = 0 if messages else self.learned.cooloffs
            return None
        if messages == 0:
            if other_sessions_alive and self.effective_connections() > 1:
                return self.on_too_many_sessions(reply or "new session dropped", now)
            return None
        self.session_ends.append(messages)
        if len(self.session_ends) == SAME_LENGTH_TO_LEARN and len(set(self.session_ends)) == 1:
            return self.learn_session_length(messages, reply)
        return None

    def learn_session_length(self, messages: int, reply: str) -> Decision | None:
        current = self.messages_per_connection()
        if current and current <= messages:
            return None
        self.learned.messages_per_connection = messages
        self.changed = True
        return Decision("learn", "session length", f"rotate sessions after {messages} messages",
                        reply)

    # ------------------------------------------------------------ reporting

    def _rate_text(self) -> str:
        rate = self.effective_rate()
        return "no rate limit" if rate is None else f"rate {rate:.3g}/s"

    def state(self, now: float) -> tuple[str, str, float | None]:
        """(state, reason, until) for status: ok, slowed, paused or parked."""
        if self.learned.parked_until and self.learned.parked_until > now:
            return "parked", f"quota: {self.learned.park_reason}", self.learned.parked_until
        if self.paused_until and self.paused_until > now:
            return "paused", self.pause_reason or "", self.paused_until
        reached = self._quotas_reached(now)
        if reached:
            limit, window, _ = reached[0]
            return "parked", f"{limit} messages per {'day' if window == DAY else 'hour'} reached", \
                self.next_start(now)
        reasons = []
        if self.learned.connections:
            reasons.append(f"connections lowered to {self.learned.connections} (too many sessions)")
        if self.learned.rate:
            reasons.append(f"rate lowered to {self.learned.rate:.3g}/s (rate refusals)")
        if reasons:
            return "slowed", "; ".join(reasons), None
        return "ok", "", None

    def window_counts(self, now: float) -> dict[str, int]:
        return {
            "minute": count_since(self.starts, now - 60),
            "hour": count_since(self.starts, now - HOUR),
            "day": count_since(self.starts, now - DAY),
        }

    def capacity(self, now: float, observed: float) -> float:
        """Messages per second this account can be expected to carry from now on, every
        host sending through it (`observed`: recent_rate, this host's part unless
        `starts` holds every host's sends)."""
        rate = self.account_rate()
        observed *= 1 if self.starts_shared else self.hosts
        estimates = [r for r in (rate, observed or None) if r]
        per_second = min(estimates) if estimates else 0.0
        size, interval = self.server.group_size, self.server.group_interval
        if per_second and size and interval:
            per_second = size / (size / per_second + interval)
        return per_second

    def seconds_for(self, count: int, now: float, observed: float) -> float | None:
        """Estimated seconds to send `count` more messages through this server."""
        per_second = self.capacity(now, observed)
        if count <= 0:
            return 0.0
        if not per_second:
            return None
        wait = max(0.0, self.next_start(now) - now)
        seconds = wait + count / per_second
        for limit, window in self.quotas():
            windows_needed = math.ceil(count / limit) - 1
            seconds = max(seconds, wait + windows_needed * window + min(count, limit) / per_second)
        return seconds
