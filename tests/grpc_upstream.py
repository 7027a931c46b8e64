"""A gRPC upstream for tests (grpcio): any method `/<service>/C<n>` ends with status n (in the
trailers, after the response headers), any other method answers an empty message with OK.

    with GrpcUpstream() as up:     # h2_cluster("grpc", up.port) routes an Envoy cluster to it
        ...
"""
from __future__ import annotations

from concurrent import futures

import grpc

CODES = {c.value[0]: c for c in grpc.StatusCode}


class _Handler(grpc.GenericRpcHandler):
    def service(self, details):
        method = details.method.rsplit("/", 1)[-1]

        def unary(_request, context):
            if method.startswith("C") and method[1:].isdigit():
                context.abort(CODES[int(method[1:])], "as asked")
            return b""

        return grpc.unary_unary_rpc_method_handler(unary)


class GrpcUpstream:
    def __init__(self):
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        self.server.add_generic_rpc_handlers((_Handler(),))
        self.port = self.server.add_insecure_port("127.0.0.1:0")

    def __enter__(self) -> "GrpcUpstream":
        self.server.start()
        return self

    def __exit__(self, *exc):
        self.server.stop(0)
