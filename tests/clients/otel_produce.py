"""Produce OpenTelemetry metrics, logs and traces to Kafka the way real agents do.

Uses the official OpenTelemetry Python SDK to record telemetry and its OTLP encoders to build the
export requests, and Python's confluent-kafka (librdkafka) to produce them: nothing here is
Foresight's code. Each request is written twice: as `otlp_proto` (protobuf, as the Collector's
Kafka exporter writes it) or as `otlp_json` (OTLP/JSON: lowerCamelCase, integer enums, hex ids).

    python otel_produce.py BROKERS PREFIX ENCODING

with ENCODING `proto` or `json` writes to PREFIX.otlp.{metrics,logs,traces}.ENCODING, as host
`py-ENCODING` and services `frontend-ENCODING` / `checkout-ENCODING`, and prints a JSON summary
of what it sent, for the test to compare with what Foresight made of it.
"""

import base64
import json
import logging
import sys
import time

from confluent_kafka import Producer
from google.protobuf.json_format import MessageToDict
from opentelemetry import trace
from opentelemetry.metrics import Observation
from opentelemetry.exporter.otlp.proto.common._log_encoder import encode_logs
from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk._logs import LoggerProvider, LoggingHandler
from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter, SimpleLogRecordProcessor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

ID_FIELDS = {"traceId", "spanId", "parentSpanId"}


def otlp_json(message):
    """OTLP/JSON: proto3 JSON with integer enums and hex (not base64) trace and span ids."""

    def fix(node):
        if isinstance(node, dict):
            return {
                k: (base64.b64decode(v).hex() if k in ID_FIELDS and isinstance(v, str) else fix(v))
                for k, v in node.items()
            }
        if isinstance(node, list):
            return [fix(v) for v in node]
        return node

    return json.dumps(fix(MessageToDict(message, use_integers_for_enums=True))).encode()


def main():
    brokers, prefix, encoding = sys.argv[1], sys.argv[2], sys.argv[3]
    host = f"py-{encoding}"
    producer = Producer({"bootstrap.servers": brokers, "enable.idempotence": True})
    sent = {"metrics": 0, "logs": 0, "traces": 0}

    def send(signal, message):
        if encoding == "proto":
            payload, content_type = message.SerializeToString(), "application/x-protobuf"
        else:
            payload, content_type = otlp_json(message), "application/json"
        producer.produce(
            f"{prefix}.otlp.{signal}.{encoding}",
            key=host,
            value=payload,
            headers={"content-type": content_type},
        )
        sent[signal] += 1

    resource = Resource.create({"host.name": host, "service.name": "py-agent"})

    def emit_logs():
        log_exporter = InMemoryLogRecordExporter()
        provider = LoggerProvider(resource=resource)
        provider.add_log_record_processor(SimpleLogRecordProcessor(log_exporter))
        logger = logging.getLogger("foresight-test")
        logger.propagate = False
        logger.addHandler(LoggingHandler(level=logging.INFO, logger_provider=provider))
        logger.setLevel(logging.INFO)
        logger.error("disk write failed", extra={"code": "EIO"})
        logger.warning("retrying")
        logger.info("ok")
        send("logs", encode_logs(log_exporter.get_finished_logs()))

    # Metrics: a counter, a gauge and a histogram, collected six times 1.1 s apart so that
    # Foresight's one-second windows close; logs between the second and third collection.
    reader = InMemoryMetricReader()
    meter = MeterProvider(resource=resource, metric_readers=[reader]).get_meter("foresight-test")
    requests = meter.create_counter("requests")
    latency = meter.create_histogram("latency_ms", explicit_bucket_boundaries_advisory=[10, 50, 100])
    depth = {"value": 0}
    meter.create_observable_gauge("queue.depth", callbacks=[lambda options: [Observation(depth["value"])]])
    for round_ in range(6):
        requests.add(5, {"route": "/checkout"})
        for ms in (5, 20, 30, 70):
            latency.record(ms)
        depth["value"] = 10 * (round_ + 1)
        send("metrics", encode_metrics(reader.get_metrics_data()))
        if round_ == 1:
            emit_logs()
        time.sleep(1.1)

    # Traces: frontend calls checkout (client span -> server span) and a database.
    span_exporter = InMemorySpanExporter()
    tracers = {}
    for service in ("frontend", "checkout"):
        tp = TracerProvider(resource=Resource.create({"service.name": f"{service}-{encoding}"}))
        tp.add_span_processor(SimpleSpanProcessor(span_exporter))
        tracers[service] = tp.get_tracer("foresight-test")
    with tracers["frontend"].start_as_current_span("GET /checkout", kind=trace.SpanKind.SERVER):
        with tracers["frontend"].start_as_current_span(
            "POST checkout", kind=trace.SpanKind.CLIENT, attributes={"peer.service": f"checkout-{encoding}"}
        ) as client:
            ctx = trace.set_span_in_context(client)
            with tracers["checkout"].start_as_current_span("POST /pay", context=ctx, kind=trace.SpanKind.SERVER):
                time.sleep(0.01)
        with tracers["frontend"].start_as_current_span(
            "SELECT", kind=trace.SpanKind.CLIENT, attributes={"db.system": "postgresql"}
        ):
            pass
    send("traces", encode_spans(span_exporter.get_finished_spans()))

    remaining = producer.flush(30)
    if remaining:
        raise SystemExit(f"{remaining} messages not delivered")
    print(json.dumps({"host": host, "sent": sent}))


if __name__ == "__main__":
    main()
