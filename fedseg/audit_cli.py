"""``fedseg audit``: check and explain what every node and the coordinator exchanged."""
from __future__ import annotations

from pathlib import Path

import click

from fedseg.cli_help import option

__all__ = ["audit"]


@click.group()
def audit() -> None:
    """Verify the signed audit logs of a run, and report what left each hospital."""


def _load(run_dir: Path, node_dirs: tuple[Path, ...]):  # noqa: ANN202 - lazy imports below
    from fedseg.node.config import NodeConfig
    from fedseg.protocol.audit.log import AUDIT_FILE
    from fedseg.protocol.audit.verify import verify_log
    from fedseg.protocol.identity import load_or_create_identity
    from fedseg.protocol.plan import Plan
    from fedseg.protocol.run_store import RunStore

    store = RunStore(run_dir)
    state, arrays = store.load()
    plan = Plan.from_dict(state.plan)
    if not store.identity.exists():
        raise click.ClickException(f"{run_dir} holds no coordinator key (coordinator.key): not a fedseg run directory")
    coordinator = verify_log(store.audit, load_or_create_identity(store.identity).public_key())
    nodes = {}
    for node_dir in node_dirs:
        config = NodeConfig.load(node_dir)
        key = node_dir / "identity.key"
        if not key.exists():
            raise click.ClickException(f"{node_dir} holds no identity key: not a fedseg node workdir")
        nodes[config.name] = verify_log(node_dir / AUDIT_FILE, load_or_create_identity(key).public_key())
    declared = {k: tuple(v.shape) for k, v in arrays.items()}
    if plan.algorithm == "lcfed":
        # LC-Fed's calibration declares one more exchange: each node's 1x1 head.
        declared.update(plan.head_layout())
    return state, plan, coordinator, nodes, declared


@audit.command()
@click.argument("run_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.argument("node_dirs", nargs=-1, required=True, type=click.Path(path_type=Path, exists=True, file_okay=False))
def verify(run_dir: Path, node_dirs: tuple[Path, ...]) -> None:
    """Check every chain and signature, that both ends logged each message alike, and the privacy policy."""
    from fedseg.protocol.audit.cross_check import cross_check
    from fedseg.protocol.audit.policy import check_policy
    from fedseg.protocol.errors import ProtocolError
    from fedseg.protocol.identity import fingerprint, load_or_create_identity

    try:
        state, plan, coordinator, nodes, declared = _load(run_dir, node_dirs)
    except ProtocolError as exc:
        raise click.ClickException(str(exc)) from None
    findings = cross_check(coordinator, nodes, run_id=state.run_id, coordinator_name="coordinator")
    if not any(e["run"] == state.run_id for e in coordinator):
        findings.append(f"the coordinator's log in {run_dir} records no message of run {state.run_id}")
    described = {e["peer"]: e["schema"]["fields"].get("fingerprint") for e in coordinator
                 if e["run"] == state.run_id and e["action"] == "describe_reply"}
    for node_dir, (name, entries) in zip(node_dirs, nodes.items()):
        # The key that signed the node's log must be the one the coordinator was shown.
        key = fingerprint(load_or_create_identity(node_dir / "identity.key").public_key())
        if name in described and described[name] != key:
            findings.append(f"node {name}: its log is signed by {key}, but it described itself as {described[name]}")
        run_entries = [e for e in entries if e["run"] == state.run_id]
        findings += check_policy(name, run_entries, declared, image_size=plan.image_size)
    if findings:
        for finding in findings:
            click.echo(finding, err=True)
        raise click.ClickException(f"audit of run {state.run_id} found {len(findings)} problem(s)")
    total = len(coordinator) + sum(len(e) for e in nodes.values())
    click.echo(f"audit clean: run {state.run_id}, {total} entries verified across the coordinator and {len(nodes)} node(s)")


@audit.command()
@click.argument("run_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.argument("node_dirs", nargs=-1, required=True, type=click.Path(path_type=Path, exists=True, file_okay=False))
@option("--out", type=click.Path(path_type=Path), default=None, show_default="RUN_DIR/audit", help="Folder for the reports.")
def report(run_dir: Path, node_dirs: tuple[Path, ...], out: Path | None) -> None:
    """Write a plain-language report per node: messages, bytes in and out, what left, refusals."""
    from fedseg.protocol.audit.policy import check_policy
    from fedseg.protocol.audit.report import summarize, write_report
    from fedseg.protocol.errors import ProtocolError

    try:
        state, plan, _, nodes, declared = _load(run_dir, node_dirs)
    except ProtocolError as exc:
        raise click.ClickException(str(exc)) from None
    out = out or run_dir / "audit"
    out.mkdir(parents=True, exist_ok=True)
    for name, entries in nodes.items():
        run_entries = [e for e in entries if e["run"] == state.run_id]
        findings = check_policy(name, run_entries, declared, image_size=plan.image_size)
        write_report(summarize(run_entries, declared), out / f"{name}.md", out / f"{name}.png",
                     title=f"Audit report: node {name}, run {state.run_id}", findings=findings)
        click.echo(f"node {name}: {out / (name + '.md')}")
