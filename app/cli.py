"""The ``mmfusion`` command. Serving commands are torch-free; training commands load ``model``
lazily and explain how to install it when the training extra is missing."""

from __future__ import annotations

import argparse
import sys

TRAIN_COMMANDS = {"train", "export", "verify", "build-default", "evaluate", "ablate"}


def _serve(argv: list[str]) -> int:
    import errno
    import os
    import socket

    import uvicorn

    parser = argparse.ArgumentParser(prog="mmfusion serve", description="Serve a model bundle over HTTP. "
                                     "Every option can also be set as MMFUSION_<OPTION> in the environment.")
    parser.add_argument("--bundle", help="bundle directory (MMFUSION_BUNDLE, default models/default)")
    parser.add_argument("--host", help="bind address (MMFUSION_HOST, default 0.0.0.0)")
    parser.add_argument("--port", type=int, help="port (MMFUSION_PORT, default 8000)")
    parser.add_argument("--index-path", help="vector index directory (MMFUSION_INDEX_PATH, default data/index)")
    args = parser.parse_args(argv)
    for key in ("bundle", "host", "port", "index_path"):
        value = getattr(args, key)
        if value is not None:
            os.environ[f"MMFUSION_{key.upper()}"] = str(value)
    from app.bundle.verify import load_bundle_manifest
    from app.core.config import SettingsError, environment_settings
    from app.core.errors import MMFusionError

    try:
        settings = environment_settings()
    except SettingsError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    try:  # a bundle that cannot load is the user's to fix: one line, not uvicorn's start-up traceback
        load_bundle_manifest(settings.bundle, check_hashes=False)
    except MMFusionError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    # The drain after SIGTERM waits for requests in flight up to their own deadline (plus the batchers'
    # last batch); with no deadline (0) it waits for them all. Docker: --stop-timeout above this.
    drain_s = settings.request_timeout_s + 5 if settings.request_timeout_s > 0 else None
    # A port in use (or reserved) is found now, not after the model has loaded for seconds. IPv6 when the
    # host has a colon, as uvicorn decides; any other bind problem is left for uvicorn to report.
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    try:
        with socket.create_server((settings.host, settings.port), family=family):
            pass
    except OSError as exc:
        if exc.errno in (errno.EADDRINUSE, errno.EACCES):
            print(f"error: cannot listen on port {settings.port} of {settings.host} ({exc.strerror}); set --port "
                  "or MMFUSION_PORT", file=sys.stderr)
            return 2
    uvicorn.run("app.main:app", host=settings.host, port=settings.port, log_level=settings.log_level,
                timeout_graceful_shutdown=drain_s, root_path=settings.root_path, proxy_headers=True,
                forwarded_allow_ips=settings.forwarded_allow_ips, timeout_keep_alive=settings.keep_alive_s)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(
            "usage: mmfusion COMMAND [options]\n\n"
            "serving (base install):\n"
            "  serve           serve a model bundle over HTTP\n"
            "  index           manage the vector index (import, stats, rebuild)\n\n"
            "training (pip install 'mmfusion[train]'):\n"
            "  train           train a fusion model\n"
            "  export          export a run to an ONNX model bundle\n"
            "  verify          re-check a bundle (sha256, ONNX checker, parity of variants)\n"
            "  evaluate        held-out metrics of a run (PyTorch) or a bundle (ONNX Runtime)\n"
            "  ablate          train every fusion strategy and the single-modality baselines, one table\n"
            "  build-default   build the default demo bundle used by `make serve`\n\n"
            "Run `mmfusion COMMAND --help` for the options of a command."
        )
        return 0
    command, rest = argv[0], argv[1:]
    if command == "serve":
        return _serve(rest)
    if command == "index":
        from app.index.cli import main as index_main

        return index_main(rest)
    if command in TRAIN_COMMANDS:
        try:
            from model.cli import main as model_main
        except ImportError as exc:
            print(f"`mmfusion {command}` needs the training extra ({exc}); install it with "
                  "pip install -c constraints.txt 'mmfusion[train]'", file=sys.stderr)
            return 2
        return model_main(argv)
    print(f"unknown command {command!r}; run `mmfusion --help`", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
