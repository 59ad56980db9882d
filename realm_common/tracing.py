"""OpenTelemetry traces: off unless the standard OTEL_* variables turn them on.

On when `OTEL_TRACES_EXPORTER` names an exporter (`otlp`, `console`) or an
OTLP endpoint is set (`OTEL_EXPORTER_OTLP_ENDPOINT`,
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, which imply `otlp`);
`OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none` keep them off. The
OTLP exporter reads its own variables (endpoint, headers, protocol). The
service name is `OTEL_SERVICE_NAME`, else the program's name.

Off, nothing is recorded and the helpers below cost a few attribute reads:
the API's no-op tracer answers, and `current_traceparent()` is "".

A job carries the W3C `traceparent` of the call that queued it (stored in
the jobs table, sent to the worker with the assignment), so one trace shows
the call, the job's wait in the queue, its run on the worker and the
server's switch to the new index generation.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

_PROPAGATOR = TraceContextTextMapPropagator()
_provider: TracerProvider | None = None


def exporters_from(environ: Mapping[str, str]) -> list[str]:
    """The exporters the OTEL_* variables ask for; empty means tracing is off."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    names = [n.strip().lower() for n in environ.get("OTEL_TRACES_EXPORTER", "").split(",")]
    names = [n for n in names if n and n != "none"]
    if "none" in environ.get("OTEL_TRACES_EXPORTER", "").lower():
        return []
    endpoint = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    if not names and endpoint:
        names = ["otlp"]
    return names


def configure(
    service_name: str,
    environ: Mapping[str, str] | None = None,
    *,
    exporter: SpanExporter | None = None,
) -> bool:
    """Install a tracer provider when the environment asks for one; True
    when tracing is on. Once per process. A test passes `exporter` (an
    in-memory one): its provider is then this module's only, not the
    process-wide one, and `shutdown()` turns tracing off again."""
    global _provider
    env = os.environ if environ is None else environ
    names = exporters_from(env)
    if exporter is None and not names:
        return False
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SimpleSpanProcessor,
    )

    provider = TracerProvider(
        resource=Resource.create({SERVICE_NAME: env.get("OTEL_SERVICE_NAME") or service_name})
    )
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    for name in names:
        if name == "console":
            provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
        elif name == "otlp":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        else:
            raise ValueError(f"OTEL_TRACES_EXPORTER: unknown exporter {name!r}; use otlp, console")
    if exporter is None:
        trace.set_tracer_provider(provider)
    _provider = provider
    return True


def enabled() -> bool:
    return _provider is not None


def shutdown() -> None:
    """Send what is buffered and stop tracing; called as the program ends."""
    global _provider
    if _provider is not None:
        _provider.shutdown()
        _provider = None


def tracer() -> trace.Tracer:
    if _provider is not None:
        return _provider.get_tracer("realm")
    return trace.get_tracer("realm")


def current_traceparent() -> str:
    """The W3C traceparent of the current span; "" when there is none."""
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return ""
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def context_of(traceparent: str) -> Context | None:
    """The context to continue a stored or received traceparent; None when
    there is nothing to continue."""
    if not traceparent:
        return None
    return _PROPAGATOR.extract({"traceparent": traceparent})


def context_from_metadata(metadata: Any) -> Context | None:
    """The caller's context from gRPC metadata (`traceparent`, `tracestate`)."""
    carrier = {str(k): str(v) for k, v in metadata or () if k in ("traceparent", "tracestate")}
    return _PROPAGATOR.extract(carrier) if carrier else None


@contextlib.contextmanager
def continued_span(
    name: str,
    traceparent: str,
    attributes: Mapping[str, object] | None = None,
    *,
    kind: trace.SpanKind = trace.SpanKind.CONSUMER,
) -> Iterator[trace.Span | None]:
    """A span continuing `traceparent` (a job's run on the worker), current
    inside the block; no span (None) when tracing is off or nothing to continue."""
    if _provider is None or not traceparent:
        yield None
        return
    with tracer().start_as_current_span(
        name, context=context_of(traceparent), kind=kind, attributes=_attributes(attributes)
    ) as span:
        yield span


def _attributes(values: Mapping[str, object] | None) -> dict[str, str | int | float | bool]:
    return {
        k: v if isinstance(v, str | int | float | bool) else str(v)
        for k, v in (values or {}).items()
    }


def record_span(
    name: str,
    traceparent: str,
    start: datetime,
    end: datetime,
    attributes: Mapping[str, object] | None = None,
) -> None:
    """A finished span between two moments (a job's wait in the queue),
    in the trace of `traceparent`; nothing when tracing is off."""
    if _provider is None or not traceparent:
        return
    span = tracer().start_span(
        name,
        context=context_of(traceparent),
        start_time=int(start.timestamp() * 1e9),
        attributes=_attributes(attributes),
    )
    span.end(end_time=int(end.timestamp() * 1e9))
