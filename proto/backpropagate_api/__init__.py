"""The API of Backpropagate: what the client and every service share, and nothing else.

- `v1/`: the gRPC API, its .proto files and the stubs `make proto` generates from them;
- `errors`: the error registry (stable codes, hints, exit codes) and `grpc_errors`, how an error
  travels in a gRPC status and is raised again on the other side;
- `settings` and `setting_sources`: every BACKPROPAGATE_* setting, and where each came from;
- `channels`: dialling a service (token, TLS); `ids`, `layout`, `statuses`, `uploads`,
  `training`: the ids, store keys, job statuses, upload ids and training configs both sides
  compute alike;
- `redaction`, `disk_full`, `local_names`, `private_files`: how secrets, full disks, names from
  elsewhere and the home directory's files are handled, the same way on both sides.

The client (`backpropagate`) imports this package and reaches the services
(`backpropagate_services`) only to run them in its own process, so a client-only install
(`pip install backpropagate`: no torch) runs against any stack. Services import this package,
never the client.
"""
