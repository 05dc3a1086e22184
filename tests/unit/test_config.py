"""Tests of the config loader and of the JSON Schema that ships beside it."""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path

import jsonschema
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bindscope.config.load import (
    BasicAuth,
    Config,
    ConfigError,
    ConfigIssue,
    IgnoreRule,
    PeersConfig,
    ProbeConfig,
    TLSConfig,
    UnexpectedConfig,
    default_config,
    load_config,
    parse_config,
    parse_duration,
    split_target,
)
from bindscope.model import (
    HOST_NETNS,
    NO_PROCESS,
    Exposure,
    Listener,
    ProcessInfo,
    Protocol,
    Scope,
    ServiceSpec,
    Socket,
)

FIXTURES = Path(__file__).parent.parent / "fixtures" / "configs"
DOCS = Path(__file__).parent.parent.parent / "docs" / "config.md"

SCHEMA = json.loads(resources.files("bindscope.config").joinpath("schema.json").read_text())
# Formats (ipv4, ipv6, regex) are annotations in 2020-12 unless a checker asserts them.
VALIDATOR = jsonschema.Draft202012Validator(
    SCHEMA, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
)


def schema_accepts(text: str) -> bool:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return False
    return VALIDATOR.is_valid(data)


VALID = sorted(p.name for p in (FIXTURES / "valid").glob("*.yml"))

# Every invalid fixture, and whether the schema rejects it too. False marks what a JSON
# Schema cannot say about a YAML file; the test asserts the schema does accept those, so
# the list stays honest when the schema changes.
SCHEMA_CANNOT = False
INVALID = [
    ("bad_address", True),
    ("bad_duration", True),
    ("bad_enum", True),
    ("bad_name", True),
    ("bad_peers", True),
    ("custom_tag", True),  # yaml.safe_load fails on the unknown tag
    ("duplicate_key", SCHEMA_CANNOT),  # the loader keeps the last value
    ("duplicate_name", SCHEMA_CANNOT),  # uniqueness of a property across items
    ("duplicate_port", SCHEMA_CANNOT),  # uniqueness of (port, protocol, place)
    ("duration_not_string", True),
    ("duration_too_long", SCHEMA_CANNOT),  # a range on the duration's value
    ("empty_addresses", True),
    ("empty_ignore_rule", True),
    ("invalid_regex", True),  # only with the format checker; editors may not assert it
    ("link_local_without_zone", SCHEMA_CANNOT),  # fe80::/10 is a valid ipv6 format
    ("many_issues", True),
    ("merge_key", SCHEMA_CANNOT),  # the loader merges before validation
    ("missing_required", True),
    ("multiple_documents", True),  # yaml.safe_load fails
    ("netns_and_container", True),
    ("port_out_of_range", True),
    ("port_string", True),
    ("reserved_name", True),
    ("syntax_error", True),
    ("top_level_list", True),
    ("unknown_key", True),
    ("unknown_top_key", True),
    ("wrong_section_types", True),
    ("yaml11_boolean", SCHEMA_CANNOT),  # yes/off load as booleans
    ("zero_duration", True),
]


SSHD = ProcessInfo(pid=10, name="sshd")


def listener(
    port: int = 22,
    protocol: Protocol = Protocol.TCP,
    address: str = "0.0.0.0",
    process: ProcessInfo = SSHD,
    netns: str = HOST_NETNS,
    container: str = "",
) -> Listener:
    sock = Socket(
        protocol, address, port, 6 if ":" in address else 4, None, 1, None, netns, container
    )
    return Listener(sock, process, Scope.WILDCARD, Exposure.PUBLIC)


def test_fixture_tables_cover_every_file() -> None:
    invalid = {p.stem for p in (FIXTURES / "invalid").glob("*.yml")}
    goldens = {p.stem for p in (FIXTURES / "invalid").glob("*.err")}
    assert {name for name, _ in INVALID} == invalid == goldens
    assert len(VALID) >= 5


def test_schema_is_valid_draft_2020_12() -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


@pytest.mark.parametrize("name", VALID, ids=VALID)
def test_valid_fixture_passes_loader_and_schema(name: str) -> None:
    text = (FIXTURES / "valid" / name).read_text()
    assert parse_config(text, name).source == name
    assert schema_accepts(text)


@pytest.mark.parametrize(
    ("name", "schema_rejects"), INVALID, ids=[f"{n}-schema-{s}" for n, s in INVALID]
)
def test_invalid_fixture_fails_with_its_messages(name: str, schema_rejects: bool) -> None:
    path = FIXTURES / "invalid" / f"{name}.yml"
    with pytest.raises(ConfigError) as err:
        parse_config(path.read_text(), path.name)
    assert str(err.value) + "\n" == path.with_suffix(".err").read_text()
    assert schema_accepts(path.read_text()) is not schema_rejects


def test_design_example_is_parsed_to_the_model() -> None:
    config = load_config(FIXTURES / "valid" / "design_example.yml")
    assert config == Config(
        scan_interval=15.0,
        probe=ProbeConfig(enabled=True, timeout=1.0, addresses=None),
        unexpected=UnexpectedConfig(
            report=True, ignore=(IgnoreRule(port=22, protocol=Protocol.TCP),)
        ),
        services=(
            ServiceSpec(
                name="web",
                port=5000,
                protocol=Protocol.TCP,
                expose=Exposure.PRIVATE,
                process=re.compile("^(gunicorn|uwsgi)$"),
            ),
        ),
        source=str(FIXTURES / "valid" / "design_example.yml"),
    )


def test_every_key_is_parsed() -> None:
    config = parse_config((FIXTURES / "valid" / "full.yml").read_text(), "full.yml")
    assert (config.scan_interval, config.probe) == (
        5400.0,
        ProbeConfig(False, 1.5, ("198.51.100.1", "2001:db8::1", "fe80::1%eth0", "::1")),
    )
    assert config.unexpected == UnexpectedConfig(
        report=False,
        ignore=(
            IgnoreRule(port=5353, protocol=Protocol.UDP),
            IgnoreRule(address="2001:db8::53"),
            IgnoreRule(process=re.compile("^(sshd|chronyd)$")),
            IgnoreRule(netns="blue", port=8080),
            IgnoreRule(container=re.compile("^monitoring-")),
        ),
    )
    assert [(s.name, s.port, s.protocol, s.expose) for s in config.services] == [
        ("dns", 53, Protocol.UDP, Exposure.PUBLIC),
        ("postgres", 5432, Protocol.TCP, Exposure.LOOPBACK),
        ("api_v2.internal:grpc", 8080, Protocol.TCP, Exposure.PRIVATE),
        ("flask-app", 5000, Protocol.TCP, Exposure.PRIVATE),
        ("8080", 8080, Protocol.TCP, Exposure.PRIVATE),
    ]
    by_name = {s.name: s for s in config.services}
    assert by_name["api_v2.internal:grpc"].netns == "blue"
    assert by_name["dns"].netns is None and by_name["dns"].process is None
    assert by_name["flask-app"].container == re.compile("^shop-web(-[0-9]+)?$")
    assert config.peers == PeersConfig(
        targets=("198.51.100.1:9917", "[2001:db8::1]:9917", "db-1.example:9917"),
        file_sd=("/etc/bindscope/peers.json", "/etc/bindscope/peers.d/*.yml"),
        interval=30.0,
        timeout=2.0,
        scheme="https",
        tls_config=TLSConfig(
            ca_file="/etc/bindscope/ca.pem",
            cert_file="/etc/bindscope/client.pem",
            key_file="/etc/bindscope/client.key",
            server_name="bindscope.example",
        ),
        basic_auth=BasicAuth("prom", "/etc/bindscope/peer-password"),
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("198.51.100.1:9917", ("198.51.100.1", 9917)),
        ("[2001:db8::1]:9917", ("2001:db8::1", 9917)),
        ("db-1.example:1", ("db-1.example", 1)),
    ],
    ids=["ipv4", "ipv6 in brackets", "host name"],
)
def test_split_target(text: str, expected: tuple[str, int]) -> None:
    assert split_target(text) == expected


@pytest.mark.parametrize(
    "text",
    ["198.51.100.1", "2001:db8::1:9917", "[198.51.100.1]:9917", "a_b:9917", ":9917", "h:0"],
    ids=["no port", "ipv6 without brackets", "ipv4 in brackets", "underscore", "no host", "port 0"],
)
def test_split_target_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        split_target(text)


def test_default_config_is_the_dataclass_default() -> None:
    assert default_config() == Config()
    assert default_config().source == "<embedded default>"


@pytest.mark.parametrize(
    "text",
    ["", "\n\n", "# nothing yet\n", "---\n", "~\n", "null\n"],
    ids=["empty", "blank-lines", "comment", "empty-document", "tilde", "null"],
)
def test_empty_file_is_the_default(text: str) -> None:
    assert parse_config(text, "f.yml") == Config(source="f.yml")


def test_null_sections_are_empty() -> None:
    text = (FIXTURES / "valid" / "null_sections.yml").read_text()
    assert parse_config(text, "f.yml") == Config(source="f.yml")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("15s", 15.0),
        ("1m", 60.0),
        ("1h30m", 5400.0),
        ("1d", 86400.0),
        ("1w", 604800.0),
        ("1y", 31536000.0),
        ("1m1s1ms", 61.001),
        ("0h5m", 300.0),
    ],
    ids=["ms", "s", "m", "h-m", "d", "w", "y", "three-units", "leading-zero-unit"],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", '"" is not a duration (like 500ms, 15s, 1m)'),
        ("15", '"15" is not a duration (like 500ms, 15s, 1m)'),
        ("15 s", '"15 s" is not a duration (like 500ms, 15s, 1m)'),
        ("1s1m", '"1s1m" is not a duration (like 500ms, 15s, 1m)'),
        ("1.5s", '"1.5s" is not a duration (like 500ms, 15s, 1m)'),
        ("-1s", '"-1s" is not a duration (like 500ms, 15s, 1m)'),
        ("15S", '"15S" is not a duration (like 500ms, 15s, 1m)'),
        ("0s", '"0s" is not a duration greater than zero'),
        ("0", '"0" is not a duration (like 500ms, 15s, 1m)'),
        ("9" * 20 + "y", f'"{"9" * 20}y" is too long a duration'),
    ],
    ids=[
        "empty",
        "no-unit",
        "space",
        "units-out-of-order",
        "fraction",
        "negative",
        "upper-case",
        "zero",
        "bare-zero",
        "overflow",
    ],
)
def test_parse_duration_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_duration(text)
    assert str(err.value) == message


@pytest.mark.parametrize(
    ("issue", "text"),
    [
        (
            ConfigIssue("f.yml", 3, 3, "probe.timout", "unknown key"),
            "f.yml:3:3: probe.timout: unknown key",
        ),
        (ConfigIssue("f.yml", 1, 1, "", "invalid YAML: x"), "f.yml:1:1: invalid YAML: x"),
    ],
    ids=["with-path", "without-path"],
)
def test_issue_str(issue: ConfigIssue, text: str) -> None:
    assert str(issue) == text


def test_error_lists_one_issue_a_line() -> None:
    issues = (ConfigIssue("f", 1, 2, "a", "x"), ConfigIssue("f", 3, 4, "", "y"))
    err = ConfigError(issues)
    assert (err.issues, str(err)) == (issues, "f:1:2: a: x\nf:3:4: y")


def test_load_config_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yml"
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.issues == (
        ConfigIssue(str(path), 0, 0, "", "cannot read: No such file or directory"),
    )


def test_load_config_reports_the_path(tmp_path: Path) -> None:
    path = tmp_path / "bindscope.yml"
    path.write_text("services:\n  - {name: web, port: 0, expose: public}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path}:2:23: services[0].port: 0 is not a port (1-65535)"


def test_issues_are_in_file_order() -> None:
    text = "services:\n  - {name: a, port: x, expose: y}\nscan_interval: z\nprobe: {enabled: 1}\n"
    with pytest.raises(ConfigError) as err:
        parse_config(text, "f.yml")
    assert [(i.line, i.column, i.path) for i in err.value.issues] == [
        (2, 21, "services[0].port"),
        (2, 32, "services[0].expose"),
        (3, 16, "scan_interval"),
        (4, 18, "probe.enabled"),
    ]


@pytest.mark.parametrize(
    ("rule", "lst", "matches"),
    [
        (IgnoreRule(port=22), listener(), True),
        (IgnoreRule(port=23), listener(), False),
        (IgnoreRule(port=22, protocol=Protocol.UDP), listener(), False),
        (IgnoreRule(port=22, protocol=Protocol.TCP), listener(), True),
        (IgnoreRule(address="2001:db8::1"), listener(address="2001:db8:0::1"), True),
        (IgnoreRule(address="0.0.0.0"), listener(address="::"), False),
        (IgnoreRule(process=re.compile("ssh")), listener(), True),
        (IgnoreRule(process=re.compile("^ssh$")), listener(), False),
        (IgnoreRule(process=re.compile("unknown")), listener(process=NO_PROCESS), False),
        (IgnoreRule(netns="blue"), listener(netns="blue"), True),
        (IgnoreRule(netns="blue"), listener(), False),
        (IgnoreRule(container=re.compile("^web")), listener(container="web-1"), True),
        (IgnoreRule(container=re.compile(".*")), listener(), False),
        (IgnoreRule(port=22, process=re.compile("^nginx$")), listener(process=SSHD), False),
    ],
    ids=[
        "port",
        "other-port",
        "other-protocol",
        "port-and-protocol",
        "address-normalized",
        "v4-wildcard-is-not-v6-wildcard",
        "process-search",
        "process-anchored",
        "unknown-process-never-matches",
        "netns",
        "netns-not-host",
        "container-search",
        "container-rule-never-matches-host",
        "all-fields-must-match",
    ],
)
def test_ignore_rule_matches(rule: IgnoreRule, lst: Listener, matches: bool) -> None:
    assert rule.matches(lst) is matches


def test_docs_name_every_key() -> None:
    def keys(schema: dict) -> set[str]:
        found = set(schema.get("properties", {}))
        for sub in [*schema.get("properties", {}).values(), *schema.get("$defs", {}).values()]:
            found |= keys(sub)
        return found

    docs = DOCS.read_text()
    assert {k for k in keys(SCHEMA) if f"`{k}`" not in docs} == set()


# --- properties: whatever the input, only ConfigError, and every issue located ---

VALID_TEXTS = [(FIXTURES / "valid" / n).read_text() for n in VALID]
KEYS = [
    "scan_interval",
    "probe",
    "enabled",
    "timeout",
    "addresses",
    "unexpected",
    "report",
    "ignore",
    "services",
    "name",
    "port",
    "protocol",
    "expose",
    "process",
    "netns",
    "container",
    "peers",
    "targets",
    "file_sd",
    "interval",
    "scheme",
    "tls_config",
    "ca_file",
    "basic_auth",
    "username",
    "password_file",
]
WORDS = [
    *KEYS,
    *("auto", "tcp", "udp", "loopback", "private", "public", "yes", "bindscope", "host"),
    *("15s", "0s", "500ms", "1h30m", "2d", "fe80::1%lo", "198.51.100.1", "::1", "^x$", "("),
]
YAMLISH = ":-[]{},#&*!|>'\"%@`?<= \n\t\\" + "abcpst015.~"

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-10, max_value=70000),
    st.floats(allow_nan=False),
    st.sampled_from(WORDS),
    st.text(max_size=8),
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=5), inner, max_size=5)
    ),
    max_leaves=20,
)


def service_values() -> st.SearchStrategy[dict]:
    return st.fixed_dictionaries(
        {},
        optional={
            "name": st.sampled_from(["web", "api", "db", "bindscope", "a b"]) | values,
            "port": st.sampled_from([22, 80, 5000, 0, 70000]) | values,
            "protocol": st.sampled_from(["tcp", "udp", "TCP"]) | values,
            "expose": st.sampled_from(["loopback", "private", "public", "none"]) | values,
            "process": st.sampled_from(["^x$", "", "("]) | values,
            "netns": st.sampled_from(["blue", "host", "a/b"]) | values,
            "container": st.sampled_from(["^web$", "(("]) | values,
        },
    )


near_valid = st.fixed_dictionaries(
    {},
    optional={
        "scan_interval": st.sampled_from(["15s", "500ms", "0s", "2d", "15"]) | values,
        "probe": st.fixed_dictionaries(
            {},
            optional={
                "enabled": st.booleans() | values,
                "timeout": st.sampled_from(["1s", "2m"]) | values,
                "addresses": st.sampled_from(["auto", "fe80::1%eth0", "fe80::1"])
                | st.lists(st.sampled_from(["::1", "0::1", "198.51.100.1", "fe80::1%e 0"]))
                | values,
            },
        )
        | values,
        "unexpected": st.fixed_dictionaries(
            {},
            optional={
                "report": st.booleans() | values,
                "ignore": st.lists(
                    st.dictionaries(st.sampled_from(KEYS), scalars, max_size=3), max_size=3
                )
                | values,
            },
        ),
        "services": st.lists(service_values(), max_size=4) | values,
        "extra": values,
    },
)


def mutate(text: str, data: st.DataObject) -> str:
    for _ in range(data.draw(st.integers(min_value=1, max_value=4), label="edits")):
        i = data.draw(st.integers(min_value=0, max_value=len(text)), label="at")
        j = data.draw(st.integers(min_value=i, max_value=min(len(text), i + 12)), label="to")
        new = data.draw(st.text(alphabet=YAMLISH, max_size=6) | st.sampled_from(WORDS))
        text = text[:i] + new + text[j:]
    return text


def assert_only_located_config_errors(text: str) -> None:
    try:
        config = parse_config(text, "fuzz.yml")
    except ConfigError as err:
        assert err.issues
        for issue in err.issues:
            assert issue.file == "fuzz.yml"
            assert issue.line >= 1 and issue.column >= 1, issue
            assert str(issue).startswith(f"fuzz.yml:{issue.line}:{issue.column}: ")
    else:
        assert isinstance(config, Config)


PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(st.text(alphabet=YAMLISH, max_size=120) | st.text(max_size=60))
def test_random_text_raises_only_located_config_errors(text: str) -> None:
    assert_only_located_config_errors(text)


@PROPERTY
@given(st.sampled_from(VALID_TEXTS), st.data())
def test_mutated_valid_config_raises_only_located_config_errors(
    text: str, data: st.DataObject
) -> None:
    assert_only_located_config_errors(mutate(text, data))


@PROPERTY
@given(near_valid | values)
def test_documents_the_loader_accepts_the_schema_accepts(doc: object) -> None:
    text = yaml.safe_dump(doc)
    assert_only_located_config_errors(text)
    try:
        parse_config(text, "fuzz.yml")
    except ConfigError:
        return
    assert VALIDATOR.is_valid(yaml.safe_load(text)), text
