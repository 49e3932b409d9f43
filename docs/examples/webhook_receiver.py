"""A webhook receiver for muselab's job-done callbacks, in the standard library only: it checks
each delivery's signature and prints what ended.

    MUSELAB_WEBHOOK_SECRET=... python docs/examples/webhook_receiver.py 9000

and start the server with MUSELAB_WEBHOOK_HOSTS=127.0.0.1:9000 and the same secret.
"""

import hashlib
import hmac
import json
import os
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer

SECRET = os.environ["MUSELAB_WEBHOOK_SECRET"].encode()


class Receiver(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        expected = "sha256=" + hmac.new(SECRET, body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, self.headers.get("X-Muselab-Signature", "")):
            self.send_response(401)  # not from our muselab: refused (muselab does not retry a 401)
            self.end_headers()
            return
        status = json.loads(body)
        event = self.headers["X-Muselab-Event"]
        files = [output["filename"] for output in status.get("outputs", [])]
        done = f"{status['done']}/{status['total']}" if event == "batch" else ", ".join(files)
        print(f"{event} {status['id'][:8]} {status['status']}: {done} (signature ok)", flush=True)
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


HTTPServer(("127.0.0.1", int(sys.argv[1])), Receiver).serve_forever()
