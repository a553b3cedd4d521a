"""The SROS2 policy of a fleet: `ros2 run mm_llm_ros fleet_policy --robots robot1 robot2 > fleet.policy.xml`.

The package's policy (config/sros2/mm_llm_ros.policy.xml) is written for one robot in the root namespace. In fleet
mode (`robots`, docs/design.md) the encoders and grounding run in each robot's namespace and one llm_node on the
server serves them all. This rewrites that policy for the listed robots:

- every robot-side enclave (the encoders, grounding_node, sensor_replay and the ask client) once per robot, as
  `/mm_llm_ros/<robot>/<executable>` with its profiles in the namespace `/<robot>`: relative names follow it, and
  absolute ones (/tf, /diagnostics, /rosout, /parameter_events) stay. A compromised or foreign robot can then
  publish only into its own namespace;
- llm_node's enclave keeps its node-private (~/) and absolute names, and has each relative name (embeddings,
  contexts, ask, ask_stream, scene descriptions) once per robot under `<robot>/`: in fleet mode it serves no root
  `/ask`.

Generate the keystore artifacts from the output as README.md ("Running under SROS2") shows for the package's
policy, and start each robot's nodes with `--enclave /mm_llm_ros/<robot>/<executable>`.
"""
from __future__ import annotations

import argparse
import copy
import pathlib
import sys
from collections.abc import Sequence
from xml.etree import ElementTree

from mm_llm_ros.core.errors import ConfigError
from mm_llm_ros.core.fleet import robot_namespaces

POLICY_NAME = 'mm_llm_ros.policy.xml'
SERVER_ENCLAVES = ('/mm_llm_ros/llm_node',)  # what runs on the server; every other enclave runs on each robot


def fleet_policy(base: ElementTree.Element, robots: Sequence[str]) -> ElementTree.Element:
    """`base` (a single-robot policy, every profile in the root namespace) rewritten for `robots`."""
    names = [name.strip('/') for name in robot_namespaces(robots) if name]
    if not names:
        raise ConfigError('fleet_policy needs at least one robot namespace (--robots robot1 robot2 ...)')
    policy = ElementTree.Element('policy', base.attrib)
    enclaves = ElementTree.SubElement(policy, 'enclaves')
    for enclave in base.find('enclaves'):
        path = enclave.get('path', '')
        if path in SERVER_ENCLAVES:
            enclaves.append(_served_per_robot(enclave, names))
            continue
        parent, executable = path.rsplit('/', 1)
        for robot in names:
            robot_enclave = copy.deepcopy(enclave)
            robot_enclave.set('path', f'{parent}/{robot}/{executable}')
            for profile in robot_enclave.iter('profile'):
                if profile.get('ns') != '/':
                    raise ConfigError(f"{path}: profile of {profile.get('node')} is in namespace "
                                      f"'{profile.get('ns')}'; fleet_policy starts from root-namespace profiles")
                profile.set('ns', f'/{robot}')
            enclaves.append(robot_enclave)
    return policy


def _served_per_robot(enclave: ElementTree.Element, robots: Sequence[str]) -> ElementTree.Element:
    """llm_node's enclave with each relative name once per robot (in place of the root one)."""
    served = copy.deepcopy(enclave)
    for profile in served.iter('profile'):
        for group in profile:
            children = []
            for element in group:
                name = element.text.strip()
                if name.startswith(('/', '~')):  # absolute or the node's own: as it is
                    children.append(element)
                    continue
                for robot in robots:
                    children.append(ElementTree.Element(element.tag))
                    children[-1].text = f'{robot}/{name}'
            group[:] = children
    return served


def package_policy() -> pathlib.Path:
    """The installed package's policy, else the source tree's."""
    try:
        from ament_index_python.packages import get_package_share_directory
        installed = pathlib.Path(get_package_share_directory('mm_llm_ros')) / 'config' / 'sros2' / POLICY_NAME
        if installed.is_file():
            return installed
    except (ImportError, LookupError, OSError):  # not installed, or no AMENT_PREFIX_PATH (PackageNotFoundError is a
        pass                                    # LookupError)
    return pathlib.Path(__file__).resolve().parents[1] / 'config' / 'sros2' / POLICY_NAME


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='fleet_policy', description=__doc__.split('\n\n')[0])
    parser.add_argument('--robots', nargs='+', required=True, help='robot namespaces, as in the `robots` parameter')
    parser.add_argument('--policy', type=pathlib.Path, default=None,
                        help=f'the single-robot policy to start from (default: the package\'s {POLICY_NAME})')
    parser.add_argument('--out', type=pathlib.Path, default=None, help='output file (default: standard output)')
    args = parser.parse_args(argv)
    source = args.policy or package_policy()
    try:
        policy = fleet_policy(ElementTree.parse(source).getroot(), args.robots)
    except (OSError, ElementTree.ParseError) as exc:
        print(f'fleet_policy: cannot read {source}: {exc}', file=sys.stderr)
        return 1
    except ConfigError as exc:
        print(f'fleet_policy: {exc}', file=sys.stderr)
        return 1
    ElementTree.indent(policy, space='  ')
    text = ('<?xml version="1.0" encoding="UTF-8"?>\n'
            f'<!-- Generated by fleet_policy from {source.name} for robots: {" ".join(args.robots)} -->\n'
            + ElementTree.tostring(policy, encoding='unicode') + '\n')
    if args.out is None:
        sys.stdout.write(text)
    else:
        args.out.write_text(text)
    return 0


if __name__ == '__main__':
    sys.exit(main())
