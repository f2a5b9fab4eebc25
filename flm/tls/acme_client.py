"""ACME (RFC 8555) HTTP-01 issuance on top of the maintained ``acme`` library from certbot.

The library does the protocol (JWS signing, nonces, account and order resources); this module adds
what FLM needs around it:

- **badNonce**: a CA may reject any nonce (Pebble rejects 5% on purpose). ``ClientNetwork.post``
  retries once; FLM keeps retrying (with a short, growing pause) until the request goes through,
  which is always safe because a request refused for its nonce had no effect.
- **one deadline** (90 s by default) for the whole issuance; every HTTP request's timeout is cut to
  what is left, and the attempt loop backs off between attempts that failed for a transient reason
  (server error, dropped connection). A CA that refuses connections fails at once.
- **clear errors**: every failure is a :class:`~flm.core.errors.ProxyAcmeError` that says what
  step failed and what to check.

The client is synchronous (``requests``); call :meth:`AcmeClient.obtain` from a worker thread
(``asyncio.to_thread``) when an event loop is running. While it runs, the challenge store holds the
answers FLM's HTTP port must serve at ``/.well-known/acme-challenge/{token}``.
"""

from __future__ import annotations

import logging
import socket
import ssl
import time
from collections.abc import Callable, Iterator, MutableMapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from acme import challenges, client, crypto_util, errors, messages
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from josepy.errors import DeserializationError
from josepy.jwa import ES256, ES384, ES512, RS256, JWASignature
from josepy.jwk import JWK, JWKEC, JWKRSA

from flm.core.errors import AcmeCaRefusedError, ProxyAcmeError, ProxyCertError
from flm.core.paths import write_private_file
from flm.tls.acme_options import check_acme_domain, check_acme_names
from flm.tls.certs import IssuerKey, generate_key, key_to_pem, load_key_file
from flm.tls.dns01 import challenge_name

if TYPE_CHECKING:
    from flm.tls.dns01 import Dns01Solver

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 90.0

#: Longest a single HTTP request may take (further cut to the time left before the deadline).
_REQUEST_TIMEOUT_S = 30.0
#: badNonce retries per request, on top of the library's own single retry.
_MAX_NONCE_RETRIES = 25


class _DeadlineExceededError(Exception):
    pass


class _Network(client.ClientNetwork):
    """``ClientNetwork`` that keeps retrying badNonce and cuts every request to the deadline."""

    def __init__(self, key: JWK, alg: JWASignature, verify: bool | str, deadline: float) -> None:
        super().__init__(
            key,
            alg=alg,
            user_agent="flm-acme (acme-python)",
            timeout=int(_REQUEST_TIMEOUT_S),
        )
        # requests takes either a bool or a CA bundle path for ``verify``; the library's own
        # annotation only says bool.
        self.verify_ssl = verify  # type: ignore[assignment]
        self.deadline = deadline
        self.bad_nonces = 0

    def request_timeout(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise _DeadlineExceededError
        return min(_REQUEST_TIMEOUT_S, left)

    def head(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["timeout"] = self.request_timeout()
        return super().head(*args, **kwargs)

    def get(self, url: str, content_type: str = "application/json", **kwargs: Any) -> Any:
        kwargs["timeout"] = self.request_timeout()
        return super().get(url, content_type, **kwargs)

    def post(self, *args: Any, **kwargs: Any) -> Any:
        retries = 0
        while True:
            kwargs["timeout"] = self.request_timeout()
            try:
                return super().post(*args, **kwargs)
            except messages.Error as err:
                if err.code != "badNonce" or retries >= _MAX_NONCE_RETRIES:
                    raise
            retries += 1
            self.bad_nonces += 1
            log.debug("ACME server rejected the nonce again; retry %d", retries)
            _pause(min(0.02 * 2**retries, 0.5), self.deadline)


class AcmeClient:
    """Obtain certificates from one ACME directory with one account key.

    ``account_key_path`` is created (P-256, 0600) on first use and reused afterwards; the account
    is registered (agreeing to the CA's terms of service) the first time it is needed.
    ``session_hook`` is called with each new ``requests.Session`` before it is used (the egress
    layer mounts its SOCKS5 adapter there).
    """

    def __init__(
        self,
        directory_url: str,
        email: str | None,
        account_key_path: Path,
        ca_bundle: Path | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        session_hook: Callable[[Any], None] | None = None,
    ) -> None:
        if timeout_s <= 0:
            raise ProxyAcmeError("the ACME timeout must be positive")
        self.directory_url = directory_url
        self.email = email.strip() if email else None
        self.account_key_path = Path(account_key_path)
        self.ca_bundle = Path(ca_bundle) if ca_bundle else None
        self.timeout_s = timeout_s
        self.session_hook = session_hook
        #: How many times a nonce was refused twice in a row and FLM retried (for diagnostics).
        self.bad_nonce_retries = 0
        self._account_uri: str | None = None
        self._step = "starting"

    # -- public ----------------------------------------------------------------------------------

    def obtain(self, domain: str, challenge_store: MutableMapping[str, str]) -> tuple[bytes, bytes]:
        """Run one HTTP-01 order for ``domain``; returns (full chain PEM, private key PEM).

        Raises :class:`ProxyAcmeError` on any failure, at the latest after ``timeout_s``.
        """
        return self._obtain([check_acme_domain(domain)], challenge_store, None)

    def obtain_dns(self, domains: Sequence[str], solver: Dns01Solver) -> tuple[bytes, bytes]:
        """Run one DNS-01 order for ``domains`` (one certificate naming all of them; a name may
        be a wildcard ``*.example.org``). ``solver`` publishes the TXT records and removes them
        again once the CA has looked, whatever the outcome."""
        names = check_acme_names(domains, wildcard_ok=True)
        return self._obtain(names, None, solver)

    def _obtain(
        self,
        names: list[str],
        challenge_store: MutableMapping[str, str] | None,
        solver: Dns01Solver | None,
    ) -> tuple[bytes, bytes]:
        name = ", ".join(names)
        deadline = time.monotonic() + self.timeout_s
        delay = 1.0
        attempt = 0
        while True:
            attempt += 1
            try:
                return self._obtain_once(names, challenge_store, solver, deadline)
            except Exception as exc:
                error, transient = self._translate(exc, name)
                if not transient or time.monotonic() + delay >= deadline:
                    raise error from exc
                log.info("ACME attempt %d for %s failed (%s); retrying", attempt, name, error)
            time.sleep(delay)
            delay = min(delay * 2, 10.0)

    # -- one attempt -----------------------------------------------------------------------------

    def _obtain_once(
        self,
        names: list[str],
        store: MutableMapping[str, str] | None,
        solver: Dns01Solver | None,
        deadline: float,
    ) -> tuple[bytes, bytes]:
        key, alg = self._account_key()
        verify: bool | str = str(self.ca_bundle) if self.ca_bundle else True
        net = _Network(key, alg, verify, deadline)
        if self.session_hook is not None:
            self.session_hook(net.session)
        try:
            self._step = f"fetching the ACME directory {self.directory_url}"
            directory = client.ClientV2.get_directory(self.directory_url, net)
            acme = client.ClientV2(directory, net=net)
            if getattr(directory.meta, "external_account_required", False):
                raise ProxyAcmeError(
                    "this ACME CA requires external account binding (EAB), which FLM does not "
                    "support yet"
                )
            self._register(acme)
            cert_key = generate_key()
            self._step = "creating the order"
            csr = crypto_util.make_csr(key_to_pem(cert_key), names)
            order = acme.new_order(csr)
            if solver is not None:
                self._solve_dns(acme, order, solver, deadline)
            else:
                assert store is not None
                tokens: list[str] = []
                try:
                    for authzr in order.authorizations:
                        token = self._answer(acme, authzr, store, _identifier(authzr))
                        if token is not None:
                            tokens.append(token)
                    for authzr in order.authorizations:
                        self._wait_for_authorization(acme, authzr, _identifier(authzr), deadline)
                finally:
                    for token in tokens:
                        store.pop(token, None)
            chain = self._finalize(acme, order, deadline)
        finally:
            self.bad_nonce_retries += net.bad_nonces
            net.session.close()
        return chain.encode("ascii"), key_to_pem(cert_key)

    def _account_key(self) -> tuple[JWK, JWASignature]:
        path = self.account_key_path
        try:
            key: IssuerKey = load_key_file(path) if path.exists() else _new_account_key(path)
        except ProxyCertError as exc:
            raise ProxyAcmeError(f"ACME account key: {exc.message}") from exc
        if isinstance(key, ec.EllipticCurvePrivateKey):
            algs = {"secp256r1": ES256, "secp384r1": ES384, "secp521r1": ES512}
            alg = algs.get(key.curve.name)
            if alg is None:
                raise ProxyAcmeError(f"ACME account key {path}: unsupported curve {key.curve.name}")
            return JWKEC(key=key), alg
        assert isinstance(key, rsa.RSAPrivateKey)
        return JWKRSA(key=key), RS256

    def _register(self, acme: client.ClientV2) -> None:
        if self._account_uri is not None:
            acme.net.account = messages.RegistrationResource(
                uri=self._account_uri, body=messages.Registration()
            )
            return
        self._step = "registering the ACME account"
        registration = messages.NewRegistration.from_data(
            email=self.email, terms_of_service_agreed=True
        )
        try:
            regr = acme.new_account(registration)
            self._account_uri = regr.uri
        except errors.ConflictError as exc:  # the key already has an account: use it
            self._account_uri = exc.location
            acme.net.account = messages.RegistrationResource(
                uri=exc.location, body=messages.Registration()
            )

    def _answer(
        self,
        acme: client.ClientV2,
        authzr: messages.AuthorizationResource,
        store: MutableMapping[str, str],
        domain: str,
    ) -> str | None:
        status = authzr.body.status
        if status == messages.STATUS_VALID:
            return None  # the CA reused an earlier authorization
        if status != messages.STATUS_PENDING:
            raise ProxyAcmeError(f"the ACME authorization for {domain} is {status}, not pending")
        for challb in authzr.body.challenges:
            chall = challb.chall
            if isinstance(chall, challenges.HTTP01):
                response, validation = chall.response_and_validation(acme.net.key)
                token = str(chall.encode("token"))
                store[token] = str(validation)
                self._step = "answering the HTTP-01 challenge"
                acme.answer_challenge(challb, response)
                return token
        offered = ", ".join(str(c.chall.typ) for c in authzr.body.challenges) or "none"
        raise ProxyAcmeError(
            f"the ACME CA offered no http-01 challenge for {domain} (offered: {offered})"
        )

    def _solve_dns(
        self,
        acme: client.ClientV2,
        order: messages.OrderResource,
        solver: Dns01Solver,
        deadline: float,
    ) -> None:
        """Publish every pending authorization's TXT record, answer, wait; always clean up."""
        answers: list[tuple[messages.AuthorizationResource, Any, Any]] = []
        records: list[tuple[str, str]] = []
        for authzr in order.authorizations:
            domain = _identifier(authzr)
            status = authzr.body.status
            if status == messages.STATUS_VALID:
                continue  # the CA reused an earlier authorization
            if status != messages.STATUS_PENDING:
                raise ProxyAcmeError(
                    f"the ACME authorization for {domain} is {status}, not pending"
                )
            for challb in authzr.body.challenges:
                if isinstance(challb.chall, challenges.DNS01):
                    response, validation = challb.chall.response_and_validation(acme.net.key)
                    answers.append((authzr, challb, response))
                    records.append((challenge_name(domain), str(validation)))
                    break
            else:
                offered = ", ".join(str(c.chall.typ) for c in authzr.body.challenges) or "none"
                raise ProxyAcmeError(
                    f"the ACME CA offered no dns-01 challenge for {domain} (offered: {offered})"
                )
        if not answers:
            return
        try:
            self._step = "publishing the DNS-01 TXT records"
            solver.present(records, deadline)
            self._step = "answering the DNS-01 challenges"
            for _authzr, challb, response in answers:
                acme.answer_challenge(challb, response)
            for authzr, _challb, _response in answers:
                self._wait_for_authorization(
                    acme, authzr, _identifier(authzr), deadline, dns01=True
                )
        finally:
            self._step = "removing the DNS-01 TXT records"
            solver.cleanup()

    def _wait_for_authorization(
        self,
        acme: client.ClientV2,
        authzr: messages.AuthorizationResource,
        domain: str,
        deadline: float,
        *,
        dns01: bool = False,
    ) -> None:
        self._step = f"waiting for the CA to validate {domain}"
        for delay in _poll_delays(deadline):
            current, _ = acme.poll(authzr)
            status = current.body.status
            if status == messages.STATUS_VALID:
                return
            if status not in (messages.STATUS_PENDING, messages.STATUS_PROCESSING):
                problems = [
                    str(c.error.detail or c.error) for c in current.body.challenges if c.error
                ]
                detail = "; ".join(problems) or f"status {status}"
                if dns01:
                    raise AcmeCaRefusedError(
                        f"the ACME CA refused the DNS-01 validation of {domain}: {detail}. The "
                        f"CA must find the TXT record {challenge_name(domain)} through public "
                        "DNS: check that the zone is delegated to the servers FLM updates (its "
                        "NS records at the parent) and that no stale record is cached (TTL).",
                        details={"domain": domain, "problems": problems},
                    )
                raise ProxyAcmeError(
                    f"HTTP-01 validation of {domain} failed: {detail}. The CA must be able to "
                    f"fetch http://{domain}/.well-known/acme-challenge/<token> from FLM: make "
                    "port 80 of that name reach FLM's --port (firewall, port forwarding, DNS).",
                    details={"domain": domain, "problems": problems},
                )
            _pause(delay, deadline)

    def _finalize(
        self, acme: client.ClientV2, order: messages.OrderResource, deadline: float
    ) -> str:
        self._step = "finalizing the order"
        try:
            order = acme.begin_finalization(order)
        except messages.Error as err:
            if err.code != "orderNotReady":
                raise
        new_nonce = acme.directory["newNonce"]
        for delay in _poll_delays(deadline):
            body = order.body
            if body.status == messages.STATUS_VALID and body.certificate:
                self._step = "downloading the certificate"
                response = acme.net.post(body.certificate, None, new_nonce_url=new_nonce)
                return str(response.text)
            if body.status == messages.STATUS_INVALID:
                reason = str(body.error.detail or body.error) if body.error else "no reason given"
                raise AcmeCaRefusedError(f"the ACME CA refused to issue the certificate: {reason}")
            if body.status == messages.STATUS_READY:
                order = acme.begin_finalization(order)
                continue
            _pause(delay, deadline)
            response = acme.net.post(order.uri, None, new_nonce_url=new_nonce)
            order = order.update(body=messages.Order.from_json(response.json()))
        raise _DeadlineExceededError

    # -- errors ----------------------------------------------------------------------------------

    def _translate(self, exc: Exception, domain: str) -> tuple[ProxyAcmeError, bool]:
        """FLM's error for ``exc`` and whether another attempt may succeed."""
        where = f"while {self._step}"
        if isinstance(exc, ProxyAcmeError):
            return exc, False
        if isinstance(exc, _DeadlineExceededError | errors.TimeoutError):
            return ProxyAcmeError(
                f"ACME issuance for {domain} did not finish within {self.timeout_s:g} s "
                f"(stopped {where})"
            ), False
        if isinstance(exc, messages.Error):
            code = exc.code or str(exc.typ)
            hint = _HINTS.get(code, "")
            transient = code in ("serverInternal", "badNonce")
            refused = code in _CA_REFUSALS
            return (AcmeCaRefusedError if refused else ProxyAcmeError)(
                f"the ACME server refused the request {where}: {code}: {exc.detail or exc}{hint}",
                details={"acme_error": code},
            ), transient
        if isinstance(exc, DeserializationError):
            return ProxyAcmeError(f"unexpected answer from the ACME server {where}: {exc}"), False
        if isinstance(exc, errors.Error):
            return ProxyAcmeError(f"ACME error {where}: {exc}"), False
        if isinstance(exc, OSError):  # requests' exceptions derive from OSError
            return self._network_error(exc, where)
        return ProxyAcmeError(f"unexpected failure {where}: {type(exc).__name__}: {exc}"), False

    def _network_error(self, exc: OSError, where: str) -> tuple[ProxyAcmeError, bool]:
        url = self.directory_url
        for cause in _causes(exc):
            if isinstance(cause, ssl.SSLCertVerificationError):
                return ProxyAcmeError(
                    f"cannot verify the TLS certificate of the ACME server {url} "
                    f"({cause.verify_message or cause}); if it uses a private CA, set "
                    "FLM_ACME_CA_BUNDLE to that CA's certificate"
                ), False
            if isinstance(cause, ConnectionRefusedError):
                return ProxyAcmeError(
                    f"cannot reach the ACME server at {url}: connection refused {where}. Is it "
                    "running, and is FLM_ACME_DIRECTORY right?"
                ), False
            if isinstance(cause, socket.gaierror):
                return ProxyAcmeError(
                    f"cannot resolve the ACME server's host name ({url}): check DNS and the "
                    "network (or the egress proxy)"
                ), False
        return ProxyAcmeError(
            f"network error talking to the ACME server {url} {where}: {exc}"
        ), True


#: ACME problem types that mean "the CA will not do this", not "try again" (RFC 8555 §6.7).
_CA_REFUSALS = frozenset(
    {
        "rejectedIdentifier",
        "caa",
        "unauthorized",
        "rateLimited",
        "badCSR",
        "unsupportedIdentifier",
        "dns",
        "incorrectResponse",
    }
)

_HINTS = {
    "rateLimited": " (the CA's rate limit was hit: wait, or test against the staging directory)",
    "rejectedIdentifier": " (the CA will not issue for this name)",
    "unauthorized": " (validation failed: the CA could not fetch the challenge answer)",
    "accountDoesNotExist": " (delete the ACME account key to register again)",
}


def _new_account_key(path: Path) -> IssuerKey:
    key = generate_key()
    write_private_file(path, key_to_pem(key))
    return key


def _identifier(authzr: messages.AuthorizationResource) -> str:
    """The name an authorization is for (a wildcard's base name, as RFC 8555 §7.1.4 says)."""
    return str(authzr.body.identifier.value)


def _poll_delays(deadline: float) -> Iterator[float]:
    """0.1 s, 0.2 s, … up to 2 s between polls, until the deadline."""
    delay = 0.1
    while time.monotonic() < deadline:
        yield delay
        delay = min(delay * 2, 2.0)
    raise _DeadlineExceededError


def _pause(seconds: float, deadline: float) -> None:
    left = deadline - time.monotonic()
    if left <= 0:
        raise _DeadlineExceededError
    time.sleep(min(seconds, left))


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and all it wraps: ``__cause__``, ``__context__``, urllib3's ``reason``, args."""
    seen: set[int] = set()
    stack: list[BaseException] = [exc]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        linked = [current.__cause__, current.__context__, getattr(current, "reason", None)]
        linked += [a for a in current.args if isinstance(a, BaseException)]
        stack.extend(e for e in linked if isinstance(e, BaseException))
