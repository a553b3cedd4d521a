"""Lifecycle (managed) nodes for the nodes that hold a model: `llm_node` and the encoders.

The transitions map onto four hooks a node implements, with everything ROS-specific done here once:

- configure: read the parameters, load the models, create subscriptions, publishers, services and timers. A
  configuration problem (missing or corrupt checkpoint, bad parameter, no CUDA) ends it with FAILURE and ONE log
  line naming the reason; any other exception with ERROR, also one line. Either way the node stays unconfigured
  and holds nothing.
- activate: start the worker threads; only then do the node's callbacks serve (`self.active`).
- deactivate: stop the workers; requests are answered "inactive" and sensor messages dropped and counted.
- cleanup: release the models. Every entity that configure created is destroyed here (found by comparing the
  node's entities before and after configure, so a node's configure reads like a constructor), then garbage is
  collected and CUDA's cached blocks are returned (`torch.cuda.empty_cache()`), so that the memory is free for
  other processes and a later configure loads again.

shutdown (from any state) and error processing run the same steps, so no state leaks a model or a thread.

`autostart` (a parameter, true by default, as nav2's lifecycle manager's `autostart`) makes `main()` configure
and activate the node before it spins, through `autostarted()`: a plain `ros2 run`, `ros2 launch` or test process
comes up serving with no manual step, and a configure failure still ends the process with exit code 1 and one
FATAL line, as before nodes had a lifecycle.
"""
from __future__ import annotations

import contextlib
import gc
import traceback
from typing import Callable, Iterable

from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn

from mm_llm_ros.core.device import apply_cpu_threads
from mm_llm_ros.core.params import Param
from mm_llm_ros.ros.node_main import StartupError
from mm_llm_ros.ros.parameters import declare_parameters, read_parameters

# What a user must fix: the configure transition FAILS with the message (no traceback).
CONFIGURATION_ERRORS = (StartupError, ValueError, FileNotFoundError)
INACTIVE = 'inactive'


class ManagedNode(LifecycleNode):
    """Base of the model-holding nodes: declares the parameters, runs the hooks, tracks what configure created."""

    def __init__(self, node_name: str, params: Iterable[Param]):
        super().__init__(node_name)
        self._param_specs = tuple(params)
        self.autostart = declare_parameters(self, self._param_specs)['autostart']
        self.active = False      # True between activate and deactivate: callbacks serve only then
        self.configured = False  # True between configure and cleanup: the models are loaded
        self._created: dict[str, list] = {}
        self.last_error = ''  # why the last configure or activate failed (autostart's FATAL line)
        self._bringing_up = False

    # ---- hooks (subclasses) ---------------------------------------------------------------------
    def configure(self, params: dict) -> None:
        """Load the models and create the node's entities; raise StartupError (or ValueError) to refuse."""
        raise NotImplementedError

    def activate(self) -> None:
        """Start serving (worker threads)."""

    def deactivate(self) -> None:
        """Stop every model computation; requests arriving from now on are answered "inactive"."""

    def cleanup(self) -> None:
        """Drop every reference to the models (entities are destroyed by the base)."""

    # ---- transitions ------------------------------------------------------------------------------
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        before = self._entities()
        try:
            params = read_parameters(self, self._param_specs)
            if 'cpu_threads' in params:  # before any model is built (a process-wide setting)
                apply_cpu_threads(params['cpu_threads'])
            self.configure(params)
        except CONFIGURATION_ERRORS as exc:
            return self._configure_failed(before, str(exc), TransitionCallbackReturn.FAILURE)
        except Exception as exc:  # a bug or an unforeseen library error: still one line, and nothing is kept
            self.get_logger().debug(traceback.format_exc())
            return self._configure_failed(before, f'{type(exc).__name__}: {exc}', TransitionCallbackReturn.ERROR)
        self._created = {kind: [e for e in entities if e not in before[kind]]
                         for kind, entities in self._entities().items()}
        self.configured = True
        self.last_error = ''
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            self.activate()
        except Exception as exc:
            self.last_error = f'{type(exc).__name__}: {exc}'
            self.get_logger().error(f'cannot activate: {self.last_error}')
            return TransitionCallbackReturn.ERROR  # error processing releases everything: unconfigured
        self.active = True
        return TransitionCallbackReturn.SUCCESS

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        code = self._guarded('deactivate', self._stop_serving)
        if code == TransitionCallbackReturn.SUCCESS:
            self.get_logger().info('inactive: no model work until `activate`')
        return code

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        return self._guarded('clean up', self._release)

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        return self._guarded('shut down', self._stop_serving, self._release)

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        # SUCCESS: back to unconfigured, and configure may be tried again.
        return self._guarded('recover', self._stop_serving, self._release)

    # ---- autostart ----------------------------------------------------------------------------------
    def bring_up(self) -> None:
        """configure + activate in place (before spinning); raises StartupError with the reason if either fails."""
        self._bringing_up = True
        try:
            if self.trigger_configure() != TransitionCallbackReturn.SUCCESS:
                raise StartupError(self.last_error or 'configure failed')
        finally:
            self._bringing_up = False
        if self.trigger_activate() != TransitionCallbackReturn.SUCCESS:
            raise StartupError(f'activate failed: {self.last_error}')

    # ---- internals ----------------------------------------------------------------------------------
    def _configure_failed(self, before, reason: str, code) -> TransitionCallbackReturn:
        self.last_error = reason
        self._created = {kind: [e for e in entities if e not in before[kind]]
                         for kind, entities in self._entities().items()}
        self._release(quiet=True)
        if not self._bringing_up:  # autostart: main() logs it once, as FATAL
            self.get_logger().error(f'cannot configure: {reason}')
        return code

    def _guarded(self, what: str, *steps: Callable[[], None]) -> TransitionCallbackReturn:
        """Run the steps; an exception is logged in one line and makes the transition ERROR (rclpy would swallow
        it silently)."""
        try:
            for step in steps:
                step()
        except Exception as exc:
            self.get_logger().error(f'cannot {what}: {type(exc).__name__}: {exc}')
            return TransitionCallbackReturn.ERROR
        return TransitionCallbackReturn.SUCCESS

    def _stop_serving(self) -> None:
        if self.active:
            self.active = False
            self.deactivate()

    def _release(self, quiet: bool = False) -> None:
        was_configured = self.configured
        self.configured = False
        self.cleanup()
        destroy = {'subscriptions': self.destroy_subscription, 'publishers': self.destroy_publisher,
                   'services': self.destroy_service, 'clients': self.destroy_client, 'timers': self.destroy_timer,
                   'waitables': _destroy_waitable(self)}
        for kind, entities in self._created.items():
            for entity in entities:
                destroy[kind](entity)
        self._created = {}
        freed = release_memory()
        if was_configured and not quiet:
            self.get_logger().info(f'unconfigured: models released{freed}; `configure` loads them again')

    def _entities(self) -> dict[str, list]:
        return {'subscriptions': list(self.subscriptions), 'publishers': list(self.publishers),
                'services': list(self.services), 'clients': list(self.clients), 'timers': list(self.timers),
                'waitables': list(self.waitables)}


def _destroy_waitable(node) -> Callable:
    def destroy(waitable) -> None:
        if hasattr(waitable, 'destroy'):  # an action server removes itself from the node
            waitable.destroy()
        else:
            node.remove_waitable(waitable)
    return destroy


def release_memory() -> str:
    """Collect garbage and return CUDA's cached blocks to the driver; returns ' (N MiB of CUDA memory freed)' or
    '' without CUDA."""
    gc.collect()
    try:
        import torch
    except ImportError:
        return ''
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return ''
    before = torch.cuda.memory_reserved()
    torch.cuda.empty_cache()
    return f' ({(before - torch.cuda.memory_reserved()) / 2**20:.0f} MiB of CUDA memory freed)'


def autostarted(factory: Callable[[], ManagedNode]) -> Callable[[], ManagedNode]:
    """A node factory for `run_node` that configures and activates the node when its `autostart` is true."""
    def create() -> ManagedNode:
        node = factory()
        if node.autostart:
            try:
                node.bring_up()
            except BaseException:
                with contextlib.suppress(Exception):  # a stop signal may already have ended the context
                    node.destroy_node()
                raise
        else:
            node.get_logger().info(f'unconfigured (autostart is false): `ros2 lifecycle set '
                                   f'{node.get_fully_qualified_name()} configure`, then `activate`')
        return node
    return create


def inactive_note(node: ManagedNode) -> str:
    """What a caller of an inactive node reads in the answer's note."""
    return (f'{node.get_fully_qualified_name()} is inactive (paused with its lifecycle); '
            f'`ros2 lifecycle set {node.get_fully_qualified_name()} activate` resumes it')
