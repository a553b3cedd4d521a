"""Declare a node's parameters from `core.params` (with descriptions and allowed values) and read them once."""
from __future__ import annotations

from typing import Any, Iterable

from rcl_interfaces.msg import ParameterDescriptor
from rclpy.node import Node
from rclpy.parameter import Parameter

from mm_llm_ros.core.params import Param, resolve_deprecated


def declare_parameters(node: Node, params: Iterable[Param]) -> dict[str, Any]:
    """Declare every parameter with its descriptor and return {name: validated value}.

    Raises ValueError with the parameter's name when a value is not among its allowed choices. A value set under a
    deprecated name is returned under its new name, and the node logs a warning.
    """
    values = {}
    params = list(params)
    for param in params:
        # A deprecated name has no default, so that any value a user gives it counts (see core.params._deprecated).
        descriptor = ParameterDescriptor(description=param.description, read_only=True,
                                         dynamic_typing=param.default is None)
        if param.choices:
            descriptor.additional_constraints = 'one of: ' + ', '.join(repr(c) for c in param.choices)
        # An empty list says nothing of its element type: such a parameter is a string array (e.g. `robots`),
        # and stays "not set" until given (a YAML `[]` also leaves it unset), which reads as [].
        default = Parameter.Type.STRING_ARRAY if param.default == [] else param.default
        node.declare_parameter(param.name, default, descriptor)
        values[param.name] = param.validate(_value(node, param))
    for warning in resolve_deprecated(params, values):
        node.get_logger().warning(warning)
    return values


def read_parameters(node: Node, params: Iterable[Param]) -> dict[str, Any]:
    """The current value of every declared parameter, validated (a lifecycle node reads them when it configures),
    values under deprecated names moved to their new names as when they were declared."""
    params = list(params)
    values = {param.name: param.validate(_value(node, param)) for param in params}
    resolve_deprecated(params, values)  # warned about once, when declared
    return values


def _value(node: Node, param: Param) -> Any:
    """The parameter's value; an unset list parameter reads as its (empty) default, an unset deprecated name as
    None (not set by the user)."""
    value = node.get_parameter_or(param.name, Parameter(param.name, value=None)).value
    return list(param.default) if value is None and isinstance(param.default, list) else value
