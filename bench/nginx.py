"""nginx configurations: the MES-like upstream, and the classic ``proxy_pass`` peer.

Both run in the foreground as one process (``daemon off``, ``master_process off``,
``worker_processes 1``) with every path (pid, logs, temp files) inside the benchmark's temp
directory, so nothing outside it is touched and the harness stops each by its PID.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

__all__ = [
    "DOWNLOAD_PATH",
    "ECHO_MODULE",
    "HEALTH_PATH",
    "STATUS_ANSWER",
    "UPLOAD_PATH",
    "peer_config",
    "upstream_config",
]

#: Debian's nginx-light ships the echo module; ``echo_read_request_body`` makes nginx read an
#: upload to its last byte before answering (``return`` would answer first and discard later).
ECHO_MODULE: Final = Path("/usr/lib/nginx/modules/ngx_http_echo_module.so")
#: What MES answers to a status change (docs/mes-api.md): the rule reads ``/status`` from it.
STATUS_ANSWER: Final = '{"orderId":"A-1","status":"MANUFACTURING_STARTED"}'
HEALTH_PATH: Final = "/api/v1/health"
#: The reference model routes (``model-download``/``model-upload`` rules: streamed, not inspected).
DOWNLOAD_PATH: Final = "/api/v1/orders/A-1/model"
UPLOAD_PATH: Final = "/api/v1/orders/A-2/model"
# Body buffer for an upload: larger than the 256 MiB model, so nginx keeps it in memory (and
# frees it after the answer) instead of writing a temp file: the upstream costs a memory copy.
_UPLOAD_BUFFER: Final = "512m"


def _common(prefix: Path, name: str) -> str:
    return f"""daemon off;
master_process off;
worker_processes 1;
pid "{prefix}/{name}.pid";
error_log "{prefix}/{name}-error.log" warn;
events {{
    # Enough for wrk's 64 connections plus a proxy's pool to this upstream, with headroom.
    worker_connections 4096;
}}
"""


def _http_common(prefix: Path, name: str) -> str:
    temp = prefix / f"{name}-temp"
    return f"""    access_log off;
    # Every temp path inside the benchmark directory (Debian's defaults are under /var/lib/nginx).
    client_body_temp_path "{temp}/body";
    proxy_temp_path "{temp}/proxy";
    fastcgi_temp_path "{temp}/fastcgi";
    uwsgi_temp_path "{temp}/uwsgi";
    scgi_temp_path "{temp}/scgi";
    # wrk and the proxies keep their connections for the whole run; nginx's default of 1000
    # requests per connection would make every client reconnect every few hundred ms.
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    sendfile on;
    tcp_nopush on;
"""


def upstream_config(*, prefix: Path, port: int, blob: Path, echo_module: Path = ECHO_MODULE) -> str:
    """The MES-like upstream: fixed status answers, a model file to download, a sink for uploads.

    Args:
        prefix: the benchmark's temp directory (pid, logs, temp files go there).
        port: the port to listen on, on 127.0.0.1.
        blob: the file served as the model download.
        echo_module: path of the dynamic echo module.

    Returns:
        The nginx.conf text.
    """
    return f"""load_module "{echo_module}";
{_common(prefix, "upstream")}
http {{
{_http_common(prefix, "upstream")}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location ~ ^/api/v1/orders/[^/]+/status$ {{
            default_type application/json;
            return 200 '{STATUS_ANSWER}';
        }}
        location = {HEALTH_PATH} {{
            default_type application/json;
            return 200 '{{"status":"UP"}}';
        }}
        location = {DOWNLOAD_PATH} {{
            default_type application/octet-stream;
            alias "{blob}";
        }}
        location = {UPLOAD_PATH} {{
            client_max_body_size 0;
            client_body_buffer_size {_UPLOAD_BUFFER};
            echo_read_request_body;
            echo_status 201;
            echo "stored";
        }}
    }}
}}
"""


def peer_config(*, prefix: Path, port: int, upstream_port: int) -> str:
    """nginx as the classic peer: ``proxy_pass`` with an upstream keep-alive pool, streaming both ways.

    Args:
        prefix: the benchmark's temp directory.
        port: the port to listen on, on 127.0.0.1.
        upstream_port: the upstream nginx's port.

    Returns:
        The nginx.conf text.
    """
    return f"""{_common(prefix, "peer")}
http {{
{_http_common(prefix, "peer")}
    upstream mes {{
        server 127.0.0.1:{upstream_port};
        # The pool a sidecar in front of one MES keeps: as many idle connections as wrk opens.
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        client_max_body_size 0;
        # Unbuffered uploads are forwarded in pieces of this size (default 16k: a syscall pair
        # per 16 KiB); 256k is the usual tuning for large bodies.
        client_body_buffer_size 256k;
        location / {{
            proxy_pass http://mes;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            # Stream uploads as they arrive, and downloads through bounded memory buffers with
            # no temp file, as the proxy under test must (RSS growth under 16 MiB).
            proxy_request_buffering off;
            proxy_buffer_size 64k;
            proxy_buffers 16 64k;
            proxy_busy_buffers_size 128k;
            proxy_max_temp_file_size 0;
        }}
    }}
}}
"""
