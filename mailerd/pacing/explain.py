"""`mailerctl explain`: how mailerd would read a relay's reply, and what it would do."""

from __future__ import annotations

from mailerd.pacing.classify import STAGES, Classifier, PatternConfig, enhanced_code, split_reply
from mailerd.pacing.pacer import action_for
from mailerd.schema.control import Error, Explain, Explained, Reply, StageReading


def explain_reply(request: Explain, patterns: PatternConfig) -> Reply:
    """Read `request.reply` with the daemon's patterns, at its stage or at each stage."""
    if request.stage is not None and request.stage not in STAGES:
        return Error(message=f"explain: unknown stage {request.stage!r} (stages: {', '.join(STAGES)})")
    parsed = split_reply(request.reply)
    if parsed is None:
        return Error(message="explain: give the reply with its code, e.g. "
                             "'450 4.7.1 Error: too much mail from 192.0.2.1'")
    code, text = parsed
    classifier = Classifier(patterns)
    readings = []
    for stage in [request.stage] if request.stage else list(STAGES):
        verdict = classifier.classify(stage, code, text)
        readings.append(StageReading(
            stage=stage, scope=verdict.scope.value,
            cause=verdict.cause.value if verdict.cause else None, reason=verdict.reason,
            pattern=verdict.pattern, source=verdict.source,
            action=action_for(verdict, request.reply)))
    return Explained(code=code, text=text, enhanced=enhanced_code(text), readings=readings)
