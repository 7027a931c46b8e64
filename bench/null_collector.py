#!/usr/bin/env python3
"""A null OTLP/gRPC collector for the benchmark: accepts Export on the logs, traces and metrics
services, never decodes the request (raw bytes in), answers with an empty response message.
It costs the machine as little as a gRPC server can, so the benchmark measures the senders.

Usage: null_collector.py PORT   (prints "ready" once listening)"""
import sys
from concurrent import futures

import grpc

SERVICES = ["opentelemetry.proto.collector.logs.v1.LogsService",
            "opentelemetry.proto.collector.trace.v1.TraceService",
            "opentelemetry.proto.collector.metrics.v1.MetricsService"]


def main() -> None:
    port = int(sys.argv[1])
    handler = grpc.unary_unary_rpc_method_handler(lambda request, context: b"",
                                                  request_deserializer=None, response_serializer=None)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4),
                         options=[("grpc.max_receive_message_length", 64 << 20)])
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(s, {"Export": handler}) for s in SERVICES])
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print("ready", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
