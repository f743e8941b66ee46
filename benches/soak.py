#!/usr/bin/env python3
"""Soak and fault run for Outpost (driven by benches/soak.sh).

Two roles, picked by the first argument:

  proxy LISTEN_PORT UPSTREAM_PORT LOG
      A fault proxy in front of the upstream registry. Each request is forwarded
      unchanged, except that at random it is answered 429 (Retry-After: 1), 503, stalled
      for 15 s then forwarded, or forwarded and cut off (connection reset) half-way
      through the body. Every decision is logged.

  clients OUTPOST_PORT IMAGES_JSON SECONDS CONCURRENCY RESULT_JSON
      CONCURRENCY clients pulling, for SECONDS, random images through Outpost by path
      prefix (manifest by tag, then every blob), checking every blob's sha256 against
      its digest. Counts pulls, bytes, corrupt blobs (must be 0) and failures, each with
      its time, so the driver can tell failures during the kill -9 restart window apart.
"""

import hashlib
import http.client
import json
import random
import socket
import sys
import threading
import time

ACCEPT = ("application/vnd.oci.image.manifest.v1+json, "
          "application/vnd.docker.distribution.manifest.v2+json")


def proxy(listen_port, upstream_port, log_path):
    log = open(log_path, "a", buffering=1)
    lock = threading.Lock()

    def note(line):
        with lock:
            log.write(f"{time.time():.3f} {line}\n")

    def read_head(sock):
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return None, b""
            data += chunk
        head, rest = data.split(b"\r\n\r\n", 1)
        return head + b"\r\n\r\n", rest

    def handle(client):
        try:
            head, rest = read_head(client)
            if head is None:
                return
            first = head.split(b"\r\n", 1)[0].decode("latin-1")
            roll = random.random()
            if roll < 0.04:
                note(f"429 {first}")
                client.sendall(b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 1\r\n"
                               b"Content-Length: 0\r\nConnection: close\r\n\r\n")
                return
            if roll < 0.08:
                note(f"503 {first}")
                client.sendall(b"HTTP/1.1 503 Service Unavailable\r\n"
                               b"Content-Length: 0\r\nConnection: close\r\n\r\n")
                return
            if roll < 0.10:
                note(f"stall {first}")
                time.sleep(15)
            cut = roll > 0.95
            # One request per upstream connection: the end of the response is its close.
            lines = [l for l in head.split(b"\r\n")
                     if l and not l.lower().startswith(b"connection:")]
            head = b"\r\n".join(lines) + b"\r\nConnection: close\r\n\r\n"
            up = socket.create_connection(("127.0.0.1", upstream_port))
            up.sendall(head + rest)
            sent = 0
            while True:
                chunk = up.recv(65536)
                if not chunk:
                    break
                if cut and sent > 0 and len(chunk) > 0 and sent > 32768:
                    note(f"reset {first} after {sent}")
                    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                      b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    return
                client.sendall(chunk)
                sent += len(chunk)
            up.close()
        except OSError:
            pass
        finally:
            client.close()

    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", listen_port))
    server.listen(512)
    while True:
        conn, _ = server.accept()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


def clients(port, images_path, seconds, concurrency, result_path):
    images = json.load(open(images_path))
    stop = time.time() + seconds
    lock = threading.Lock()
    totals = {"pulls": 0, "blobs": 0, "bytes": 0, "corrupt": 0, "failures": []}

    def get(conn_box, path, accept=None):
        headers = {"Accept": accept} if accept else {}
        for attempt in range(2):
            try:
                if conn_box[0] is None:
                    conn_box[0] = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                conn_box[0].request("GET", path, headers=headers)
                r = conn_box[0].getresponse()
                return r.status, r.read()
            except (OSError, http.client.HTTPException) as e:
                if conn_box[0] is not None:
                    conn_box[0].close()
                conn_box[0] = None
                if attempt == 1:
                    return None, str(e).encode()
        return None, b""

    def worker():
        conn_box = [None]
        while time.time() < stop:
            image = random.choice(images)
            repo, tag = image["repo"], image["tag"]
            status, body = get(conn_box, f"/v2/central.corp/{repo}/manifests/{tag}", ACCEPT)
            if status != 200:
                with lock:
                    totals["failures"].append([time.time(), f"manifest {repo}:{tag}", status,
                                               body[:200].decode("latin-1")])
                continue
            manifest = json.loads(body)
            ok = True
            for layer in [manifest["config"]] + manifest["layers"]:
                digest = layer["digest"]
                status, blob = get(conn_box, f"/v2/central.corp/{repo}/blobs/{digest}")
                if status != 200:
                    ok = False
                    with lock:
                        totals["failures"].append([time.time(), f"blob {repo}@{digest}", status,
                                                   blob[:200].decode("latin-1")])
                    break
                good = "sha256:" + hashlib.sha256(blob).hexdigest() == digest
                with lock:
                    totals["blobs"] += 1
                    totals["bytes"] += len(blob)
                    if not good:
                        totals["corrupt"] += 1
            if ok:
                with lock:
                    totals["pulls"] += 1

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    json.dump(totals, open(result_path, "w"))


if __name__ == "__main__":
    role = sys.argv[1]
    if role == "proxy":
        proxy(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
    elif role == "clients":
        clients(int(sys.argv[2]), sys.argv[3], float(sys.argv[4]), int(sys.argv[5]), sys.argv[6])
    else:
        sys.exit(f"unknown role {role}")
