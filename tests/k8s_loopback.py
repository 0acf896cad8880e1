"""A loopback stand-in for the few Kubernetes API endpoints tasks/kubernetes.py calls (no API server installs here).

    POST   /apis/jobset.x-k8s.io/v1alpha2/namespaces/NS/jobsets        create (201, the object back)
    GET    /apis/jobset.x-k8s.io/v1alpha2/namespaces/NS/jobsets/NAME   the object with its status
    DELETE /apis/jobset.x-k8s.io/v1alpha2/namespaces/NS/jobsets/NAME   delete (200 Status; 404 when unknown)

Its controller plays the JobSet controller and the kubelet on this machine: mode "run" starts one
process per pod with the pod's own command and environment ($(VAR) expanded as the kubelet does; the
downward-API PD_COORDINATOR and PD_POD_IP read 127.0.0.1), and reports Running while any runs,
then Completed (all exited 0) or Failed (a pod exited non-zero); mode "hold" leaves the pods
Pending forever. Requests are recorded as (method, path, body).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

PREFIX = "/apis/jobset.x-k8s.io/v1alpha2/namespaces/"
DOWNWARD = {"PD_COORDINATOR": "127.0.0.1", "PD_POD_IP": "127.0.0.1"}


def _expand(text: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), text)


class LoopbackJobSets:
    """The API server and controller; use as a context manager, ``host`` is its URL."""

    def __init__(self, *, mode: str, log_dir: Path):
        self.mode, self.log_dir = mode, log_dir
        self.requests: list[tuple[str, str, Any]] = []
        self.objects: dict[str, dict[str, Any]] = {}
        self.pods: dict[str, list[subprocess.Popen]] = {}
        self.created = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _reply(self, code: int, doc: dict[str, Any]) -> None:
                data = json.dumps(doc).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> Any:
                size = int(self.headers.get("Content-Length") or 0)
                return json.loads(self.rfile.read(size)) if size else None

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self._body()
                outer.requests.append(("POST", self.path, body))
                if not self.path.startswith(PREFIX) or not self.path.endswith("/jobsets"):
                    return self._reply(404, {"kind": "Status", "status": "Failure", "code": 404})
                outer.objects[body["metadata"]["name"]] = body
                outer.start(body)
                outer.created.set()
                return self._reply(201, body)

            def do_GET(self) -> None:  # noqa: N802
                outer.requests.append(("GET", self.path, None))
                name = self.path.rsplit("/", 1)[-1]
                if name not in outer.objects:
                    return self._reply(404, {"kind": "Status", "status": "Failure", "code": 404})
                return self._reply(200, {**outer.objects[name], "status": outer.status(name)})

            def do_DELETE(self) -> None:  # noqa: N802
                outer.requests.append(("DELETE", self.path, self._body()))
                name = self.path.rsplit("/", 1)[-1]
                if outer.objects.pop(name, None) is None:
                    return self._reply(404, {"kind": "Status", "status": "Failure", "code": 404})
                outer.stop(name)
                return self._reply(200, {"kind": "Status", "status": "Success"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.host = f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self, body: dict[str, Any]) -> None:
        name = body["metadata"]["name"]
        if self.mode != "run":
            self.pods[name] = []
            return
        (rjob,) = body["spec"]["replicatedJobs"]
        spec = rjob["template"]["spec"]
        (container,) = spec["template"]["spec"]["containers"]
        env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
        env.update({e["name"]: DOWNWARD[e["name"]] for e in container["env"] if "valueFrom" in e})
        base = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])}
        pods = []
        for index in range(spec["completions"]):
            pod_env = {**base, **env, "JOB_COMPLETION_INDEX": str(index)}
            command = [_expand(part, pod_env) for part in container["command"]]
            with open(self.log_dir / f"{name}-{index}.log", "w") as out:
                pods.append(subprocess.Popen(command, env=pod_env, stdout=out, stderr=subprocess.STDOUT,
                                             start_new_session=True))
        self.pods[name] = pods

    def status(self, name: str) -> dict[str, Any]:
        pods = self.pods.get(name, [])
        codes = [p.poll() for p in pods]
        active = sum(c is None for c in codes)
        status: dict[str, Any] = {"restarts": 0, "replicatedJobsStatus": [
            {"name": "node", "active": active, "ready": active, "succeeded": 0, "failed": 0, "suspended": 0}]}
        if pods and active == 0:
            failed = any(c != 0 for c in codes)
            kind = "Failed" if failed else "Completed"
            reason, message = (("FailedJobs", "jobset failed due to one or more job failures") if failed
                               else ("AllJobsCompleted", "jobset completed successfully"))
            status["conditions"] = [{"type": kind, "status": "True", "reason": reason, "message": message}]
            status["terminalState"] = kind
        return status

    def stop(self, name: str) -> None:
        for proc in self.pods.get(name, []):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def __enter__(self) -> LoopbackJobSets:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: Any) -> None:
        for name in list(self.pods):
            self.stop(name)
        self.server.shutdown()
        self.server.server_close()
