"""Reaching the front end: addresses with the default port, TLS inputs checked before gRPC sees them, and a
fast, plain diagnosis when a server cannot be reached (instead of gRPC retrying in silence).

`check_tls_inputs` runs before any channel is built: gRPC's C core aborts the whole process on a client
certificate without its key. `diagnose` runs only after the channel failed to become ready within the
connect timeout; it probes with the standard library (DNS, TCP, a TLS handshake with the same roots and
certificate) to say which step failed and what to try.
"""

from __future__ import annotations

import socket
import ssl
import tempfile
from pathlib import Path

from .errors import Florence2Error

DEFAULT_PORT = 50051
SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:", "xds:")


class ServerUnreachable(Florence2Error):
    """No gRPC connection to the server within the connect timeout; the message says why and what to try."""

    reason = "SERVER_UNREACHABLE"

    def __init__(self, address: str, why: str, hint: str):
        super().__init__(f"cannot connect to {address}: {why}" + (f"; {hint}" if hint else ""))
        self.address, self.why, self.hint = address, why, hint


def with_default_port(address: str) -> str:
    """`host` -> `host:50051` (gRPC would go to 443); `[::1]` -> `[::1]:50051`; targets with a scheme as given."""
    if address.startswith(SCHEMES) or "://" in address:
        return address
    if address.startswith("["):
        return address if "]:" in address else f"{address}:{DEFAULT_PORT}"
    if address.count(":") > 1:  # a bare IPv6 address
        return f"[{address}]:{DEFAULT_PORT}"
    return address if ":" in address else f"{address}:{DEFAULT_PORT}"


def host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of a plain host:port address; None for targets with a scheme (nothing to probe simply)."""
    if address.startswith(SCHEMES) or "://" in address:
        return None
    host, _, port = address.rpartition(":")
    if not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def check_tls_inputs(root_certificates: bytes | None, certificate_chain: bytes | None,
                     private_key: bytes | None) -> None:
    """ValueError naming the problem: a certificate without its key (or the reverse), or bytes that are not PEM."""
    if (certificate_chain is None) != (private_key is None):
        given, missing = (("a client certificate", "its private key") if certificate_chain is not None
                          else ("a private key", "its client certificate"))
        raise ValueError(f"mutual TLS needs {given} and {missing} together (CLI: --cert with --key; "
                         "client: certificate_chain= with private_key=)")
    for name, data, marker in (("root certificates", root_certificates, b"-----BEGIN CERTIFICATE"),
                               ("client certificate", certificate_chain, b"-----BEGIN CERTIFICATE"),
                               ("private key", private_key, b"PRIVATE KEY-----")):
        if data is None:
            continue
        if not isinstance(data, bytes):
            raise ValueError(f"{name} must be PEM bytes, got {type(data).__name__}")
        if marker not in data:
            raise ValueError(f"the {name} are not PEM" if name.endswith("s") else f"the {name} is not PEM")
    if certificate_chain is not None:
        _check_key_pair(certificate_chain, private_key)


def _check_key_pair(chain: bytes, key: bytes) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    with tempfile.TemporaryDirectory() as folder:
        cert_path, key_path = Path(folder, "cert.pem"), Path(folder, "key.pem")
        cert_path.write_bytes(chain)
        key_path.write_bytes(key)
        try:
            context.load_cert_chain(cert_path, key_path)
        except ssl.SSLError as exc:
            raise ValueError(f"the client certificate and private key do not go together ({exc.reason or exc})") \
                from None


SERVER_HINT = "start one with `florence2 up`, or point --server (env FLORENCE2_SERVER) at yours"


def _connect(address: str, timeout: float) -> tuple[socket.socket | None, ServerUnreachable | None]:
    """(an open TCP connection, None), or (None, the problem below gRPC: unknown host, nothing listening,
    no route); (None, None) for a target with a scheme this cannot probe."""
    target = host_port(address)
    if target is None:
        return None, None
    host, port = target
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return None, ServerUnreachable(address, f"unknown host {host!r}", "check --server (env FLORENCE2_SERVER)")
    try:
        return socket.create_connection((infos[0][4][0], port), timeout=timeout), None
    except ConnectionRefusedError:
        return None, ServerUnreachable(address, "nothing is listening there", SERVER_HINT)
    except OSError as exc:
        return None, ServerUnreachable(address, f"no answer ({exc.strerror or exc})",
                                       "check the address and any firewall between; " + SERVER_HINT)


def network_problem(address: str, timeout: float = 3.0) -> ServerUnreachable | None:
    """A problem below gRPC that is certain at once (unknown host, nothing listening, no route); None if the
    host answers on the port (or the target has a scheme this cannot probe)."""
    sock, problem = _connect(address, timeout)
    if sock is not None:
        sock.close()
    return problem


def diagnose(address: str, tls: bool, root_certificates: bytes | None = None,
             certificate_chain: bytes | None = None, private_key: bytes | None = None,
             timeout: float = 3.0) -> ServerUnreachable:
    """Why `address` gave no gRPC connection, as a ServerUnreachable to raise."""
    sock, problem = _connect(address, timeout)
    if problem is not None:
        return problem
    if sock is None:
        return ServerUnreachable(address, "no connection within the connect timeout", SERVER_HINT)
    with sock:
        return _diagnose_protocol(address, sock, host_port(address)[0], tls, root_certificates, certificate_chain,
                                  private_key, timeout)


def _diagnose_protocol(address, sock, host, tls, root, chain, key, timeout) -> ServerUnreachable:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.set_alpn_protocols(["h2"])
    if not tls:  # a plaintext client: does the server want TLS?
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        try:
            with context.wrap_socket(sock, server_hostname=host):
                pass
        except (ssl.SSLError, OSError):
            return ServerUnreachable(address, "the server accepted the connection but did not answer gRPC",
                                     "is it a florence2 front end? (`florence2 serve` or `up`)")
        return ServerUnreachable(address, "the server speaks TLS and this client plaintext",
                                 "add --tls (and --ca CA.pem for a private CA; env FLORENCE2_TLS, FLORENCE2_CA)")
    with tempfile.TemporaryDirectory() as folder:
        if root:
            context.load_verify_locations(cadata=root.decode("ascii", "replace"))
        else:
            context.load_default_certs()
        if chain and key:
            cert_path, key_path = Path(folder, "cert.pem"), Path(folder, "key.pem")
            cert_path.write_bytes(chain)
            key_path.write_bytes(key)
            context.load_cert_chain(cert_path, key_path)
        try:
            with context.wrap_socket(sock, server_hostname=host) as secure:
                secure.settimeout(min(timeout, 1.0))
                secure.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000"))
                if not secure.recv(1):  # TLS 1.3: a missing or refused client certificate shows only here
                    raise ConnectionResetError("closed by the server after the handshake")
        except ssl.SSLCertVerificationError as exc:
            if "mismatch" in (exc.verify_message or ""):
                return ServerUnreachable(address, f"its certificate does not name {host} ({exc.verify_message})",
                                         "connect by a name or address the certificate holds")
            return ServerUnreachable(address, f"its certificate is not trusted ({exc.verify_message})",
                                     "pass the CA that signed it with --ca CA.pem (env FLORENCE2_CA)")
        except ssl.SSLError as exc:
            text = f"{exc.reason or ''} {exc}".upper()
            if "CERTIFICATE_REQUIRED" in text or ("HANDSHAKE_FAILURE" in text and not chain):
                return ServerUnreachable(address, "the server requires a client certificate (mutual TLS)",
                                         "pass --cert CERT.pem and --key KEY.pem")
            if "CERTIFICATE" in text and chain:
                return ServerUnreachable(address, "the server refused this client certificate",
                                         "use one signed by the CA the server trusts (--tls-client-ca)")
            if "WRONG_VERSION_NUMBER" in text or "RECORD" in text or "PACKET" in text:
                return ServerUnreachable(address, "the server does not speak TLS there",
                                         "drop --tls/--ca (env FLORENCE2_TLS, FLORENCE2_CA)")
            return ServerUnreachable(address, f"the TLS handshake failed ({exc.reason or exc})",
                                     "check --tls, --ca, --cert and --key")
        except (TimeoutError, socket.timeout):
            pass  # the handshake held: the TLS settings are not the problem
        except OSError as exc:
            if chain is None:
                return ServerUnreachable(address, "the server requires a client certificate (mutual TLS)",
                                         "pass --cert CERT.pem and --key KEY.pem")
            return ServerUnreachable(address, f"the server closed the TLS connection ({exc.strerror or exc}): it "
                                              "may not accept this client certificate",
                                     "use one signed by the CA the server trusts (its --tls-client-ca)")
    return ServerUnreachable(address, "TLS works but no gRPC connection came up in time",
                             "is it a florence2 front end? try a longer --connect-timeout")
