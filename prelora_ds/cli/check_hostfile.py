"""Check a deepspeed hostfile on the node about to start, before launching (e.g. in a SLURM or Kubernetes script).

  prelora check-hostfile hostfiles/a100_16x4 --node_rank 3
  prelora check-hostfile hostfiles/a100_16x4 --node_rank 3 --num_gpus 4
  prelora check-hostfile hostfiles/a100_16x4 --node_rank 3 --no_ssh      # for `deepspeed --no_ssh --node_rank 3`

The checks of `prelora_ds.distributed.hostfile.check_node`, which every rank also runs before its process group:
a host that does not resolve, a node rank outside the hostfile (the launcher stops on an assertion) or naming
another host than this machine, more ranks than the host's slots, more slots than this node's GPUs. Exit code 2
and the reason (`prelora check-hostfile: error: ...`), or 0 and a one-line summary. With --no_ssh (one launcher
per node, the rendezvous at --master_addr: the names are never resolved) a host that does not resolve is a
warning (`prelora check-hostfile: warning: ...`), not an error; pdsh/ssh and MPI launchers need the names.
"""

from __future__ import annotations

import argparse
import sys

from prelora_ds.cli import CommandError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="prelora check-hostfile", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("hostfile", help="the hostfile the launcher will read ('HOST slots=N' lines)")
    parser.add_argument("--node_rank", type=int, required=True, help="the --node_rank this node will get")
    parser.add_argument("--num_gpus", type=int, default=None, help="ranks per node, when passed to the launcher")
    parser.add_argument("--no_ssh", action="store_true",
                        help="the node will be started with deepspeed --no_ssh: names need not resolve (a warning)")
    args = parser.parse_args(argv)

    from prelora_ds.distributed.hostfile import check_node, read
    from prelora_ds.errors import ConfigError

    try:
        hosts = read(args.hostfile)
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else None
        warnings = check_node(hosts, args.node_rank, args.num_gpus, gpus, source=f"hostfile {args.hostfile}",
                              names_used=not args.no_ssh)
    except ConfigError as exc:
        raise CommandError(str(exc)) from exc
    for warning in warnings:
        print(f"prelora check-hostfile: warning: {warning}", file=sys.stderr)
    names = list(hosts)
    print(f"{args.hostfile}: {len(names)} node(s), {sum(hosts.values())} rank(s); this is {names[args.node_rank]} "
          f"(node rank {args.node_rank}, {hosts[names[args.node_rank]]} slot(s))")
    return 0
