"""The changes diagnose advises: a program's bind setting, the address to bind, and the
firewall command that opens or closes a port."""

from __future__ import annotations

from bindscope.diagnose.programs import Culprit, program_base
from bindscope.model import (
    Exposure,
    Firewall,
    HostAddress,
    Scope,
)
from bindscope.netfilter.ruleset import Decision


def opening_command(decision: Decision, protocol: str, port: int) -> str:
    """A command that lets other hosts in, for a DROP decision; "" otherwise."""
    if decision.verdict is not Firewall.DROP:
        return ""
    return _command(decision, protocol, port, allow=True)


def closing_command(decision: Decision, protocol: str, port: int) -> str:
    """A command that keeps other hosts out, for an ACCEPT decision; "" otherwise."""
    if decision.verdict is not Firewall.ACCEPT:
        return ""
    return _command(decision, protocol, port, allow=False)


def _command(d: Decision, protocol: str, port: int, allow: bool) -> str:
    if d.manager == "ufw":
        return f"ufw {'allow' if allow else 'deny'} {port}/{protocol}"
    if d.manager == "firewalld":
        zone = ""
        if d.chain.startswith("filter_IN_"):
            zone = " --zone=" + d.chain.removeprefix("filter_IN_").split("_")[0]
        verb = "add" if allow else "remove"
        return (
            f"firewall-cmd --permanent{zone} --{verb}-port={port}/{protocol}"
            " && firewall-cmd --reload"
        )
    target = "accept" if allow else "drop"
    # iptables-nft writes tables nft shows as plain `ip filter` with upper-case chains;
    # nft itself warns against editing those, so the fix goes through iptables
    written_by_iptables = d.family in ("ip", "ip6") and d.table == "filter" and d.chain.isupper()
    if d.backend.startswith("iptables") or not d.table or written_by_iptables:
        tool = "ip6tables" if d.family == "ip6" else "iptables"
        chain = d.chain if written_by_iptables else "INPUT"
        return f"{tool} -I {chain} -p {protocol} --dport {port} -j {target.upper()}"
    return f"nft insert rule {d.family} {d.table} {d.chain} {protocol} dport {port} {target}"


def bind_change(culprit: Culprit | None, port: int, host: str) -> list[str]:
    """The concrete change that makes this program listen on `host` (an address)."""
    h = f"[{host}]" if ":" in host else host
    kind = culprit.kind if culprit else ""
    if kind == "flask":
        module = program_base(culprit.script).removesuffix(".py") or "app"
        fixes = []
        if culprit.line:
            fixes.append(
                f"in {culprit.script} line {culprit.line}: change `{culprit.call}` to "
                f'`{culprit.var}.run(host="{host}", port={port})`'
            )
        else:
            fixes.append(f'call `app.run(host="{host}", port={port})`')
        fixes.append(
            f"or, better outside development, serve it with gunicorn: "
            f"`gunicorn -b {h}:{port} {module}:{culprit.var}` (or uWSGI: "
            f"`uwsgi --http {h}:{port} --module {module}:{culprit.var}`)"
        )
        return fixes
    if kind == "flask-cli":
        return [
            f"`flask run --host={host} --port={port}` (or set FLASK_RUN_HOST={host})",
            f"or serve it with gunicorn: `gunicorn -b {h}:{port} module:app`",
        ]
    if kind == "django":
        return [
            f"`python manage.py runserver {h}:{port}`, and add the host's name to "
            "ALLOWED_HOSTS in settings.py",
            f"or serve it with gunicorn: `gunicorn -b {h}:{port} project.wsgi`",
        ]
    if kind == "gunicorn":
        return [
            f"`gunicorn -b {h}:{port} {culprit.app or 'module:app'}` "
            f'(or bind = "{h}:{port}" in gunicorn.conf.py)'
        ]
    if kind == "uvicorn":
        if culprit.line:
            return [
                f'in {culprit.script} line {culprit.line}: pass host="{host}" to '
                f'uvicorn.run(): `uvicorn.run(app, host="{host}", port={port})`'
            ]
        return [f"`uvicorn {culprit.app or 'module:app'} --host {host} --port {port}`"]
    if kind == "jupyter":
        return [
            f"`jupyter lab --ip={host} --port={port}` (or c.ServerApp.ip = '{host}'); "
            "keep its token or password: it runs code for whoever connects"
        ]
    if kind == "http.server":
        return [f"`python3 -m http.server --bind {host} {port}`"]
    if kind == "node":
        return [
            f'`server.listen({port}, "{host}")` instead of "localhost" or "127.0.0.1" '
            '(since Node 17 "localhost" may mean ::1 only), or set the host your '
            "framework reads (HOST=" + host + ")"
        ]
    if kind == "next":
        return [f"`next start -H {host} -p {port}` (`next dev -H {host}` in development)"]
    if kind == "vite":
        return [f"`vite --host {host} --port {port}` (or server.host in vite.config)"]
    if kind == "redis":
        return [
            f"`bind {host}` in redis.conf (keep protected-mode and requirepass), then restart redis"
        ]
    if kind == "mysql":
        return [
            f"`bind-address = {host}` under [mysqld] (my.cnf, or "
            "/etc/mysql/mariadb.conf.d/50-server.cnf), then restart it"
        ]
    if kind == "postgres":
        return [
            f"`listen_addresses = '{host}'` in postgresql.conf (and a matching host line "
            "in pg_hba.conf), then restart PostgreSQL"
        ]
    if kind == "memcached":
        return [f"`-l {host}` in /etc/memcached.conf, then restart memcached"]
    if kind == "mongod":
        return [
            f"`net.bindIp: {host}` in /etc/mongod.conf (or --bind_ip {host}), then restart mongod"
        ]
    if kind == "elasticsearch":
        return [f"`network.host: {host}` in elasticsearch.yml, then restart it"]
    if kind == "publisher":
        return [
            f"publish it on {host}: `-p {h}:{port}:PORT_INSIDE` in `docker run` / `podman run` "
            "(`ports:` in compose), then recreate the container"
        ]
    if kind == "bindscope":
        return [f"--web.listen-address={h}:{port}"]
    return [f"make the program listen on {host}: look for its host, bind or listen setting"]


def widen_host(expose: Exposure, addresses: tuple[HostAddress, ...]) -> str:
    """Where to bind so other hosts can connect without going wider than declared."""
    if expose is Exposure.PRIVATE and any(a.scope is Scope.PUBLIC for a in addresses):
        private = [a for a in addresses if a.scope is Scope.PRIVATE]
        if private:
            return private[0].address
    return "0.0.0.0"


def narrow_host(expose: Exposure, addresses: tuple[HostAddress, ...]) -> str:
    if expose is Exposure.PRIVATE:
        private = [a for a in addresses if a.scope is Scope.PRIVATE and a.family == 4]
        if private:
            return private[0].address
    return "127.0.0.1"
