"""``training_graph``: building the gradient graph behind a forward node (spec/graph.md §8.2).

Algorithm:

1. The start gradient is ``source_gradient`` or, when None, the start node's ``result_image``.
   Loss nodes (MPSCNNLossNode, MPSCNNYOLOLossNode) are their own gradient: the gradient must be
   None or their result image, and the walk starts at the producer of the loss's source with the
   loss's result image as gradient (a loss reading a graph input returns ``[loss]``).
2. Walk backwards from the start filter along image links only, collecting the forward filters
   that lead to it; count, for each image, how many collected filters read it.
3. Visit the collected filters in reverse execution order. A filter whose result received
   several gradients gets them summed by an inserted :class:`~mpsnn.MPSNNAdditionNode`
   (``node_handler`` sees it with ``inference_node=None``, CONFLICT §15). The filter's gradient
   nodes (one per source image, ``gradient_filters_with_sources``) then give the gradients of
   its sources.
4. Propagation stops at graph inputs (images without a producer), at images with
   ``stop_gradient`` and at filters without a gradient (binary convolution, comparison, division,
   reductions other than spatial mean). For an input with ``stop_gradient`` no gradient node
   is made unless the filter is trainable (its weights still learn) (inferred).
5. ``node_handler(gradient_node, inference_node, inference_source, gradient_source)`` is called
   for every node made; with no handler, ``inference_source.handle`` is copied to the gradient
   node's result image. Trainable forward nodes pass their ``training_style`` on.
6. The result is the list of terminal nodes (whose result image no made node reads), in the
   order they were made; None when nothing was made.
"""
from __future__ import annotations

from typing import Any

from ..core.errors import MPSValueError
from .nodes.base import MPSNNFilterNode, MPSNNGradientFilterNode, MPSNNImageNode, MPSNNTrainableNode, NodeHandler


def _is_loss(node: MPSNNFilterNode) -> bool:
    return bool(getattr(node, "_is_own_gradient", False))


def _collect(start: MPSNNFilterNode) -> list[MPSNNFilterNode]:
    """Forward filters that reach ``start`` through image links, in execution order (start last)."""
    order: list[MPSNNFilterNode] = []
    state: dict[int, int] = {}
    stack: list[tuple[MPSNNFilterNode, int]] = [(start, 0)]
    state[id(start)] = 1
    while stack:
        node, k = stack[-1]
        srcs = node._source_images
        if k < len(srcs):
            stack[-1] = (node, k + 1)
            prod = srcs[k]._producer
            if prod is None or isinstance(prod, MPSNNGradientFilterNode):
                continue
            s = state.get(id(prod))
            if s == 1:
                raise MPSValueError(f"{start._describe()}: training_graph found a cycle through {prod._describe()}")
            if s is None:
                state[id(prod)] = 1
                stack.append((prod, 0))
        else:
            stack.pop()
            state[id(node)] = 2
            order.append(node)
    return order


def build_training_graph(start: MPSNNFilterNode, source_gradient: MPSNNImageNode | None, node_handler: NodeHandler | None) -> list[MPSNNFilterNode] | None:
    owner = start._describe()
    if source_gradient is not None and not isinstance(source_gradient, MPSNNImageNode):
        raise MPSValueError(f"{owner}: `source_gradient` must be an MPSNNImageNode or None, but got {type(source_gradient).__name__}")
    if _is_loss(start):
        if source_gradient is not None and source_gradient is not start.result_image:
            raise MPSValueError(f"{owner}: a loss node is its own gradient; `source_gradient` must be None or the loss node's result_image")
        producer = start._source_images[0]._producer
        if producer is None:
            return [start]
        return _build(producer, start.result_image, node_handler)
    return _build(start, source_gradient if source_gradient is not None else start.result_image, node_handler)


def _default_handler(gradient_node: MPSNNFilterNode, inference_node: Any, inference_source: MPSNNImageNode, gradient_source: MPSNNImageNode) -> None:
    gradient_node.result_image.handle = inference_source.handle


def _build(start: MPSNNFilterNode, gradient: MPSNNImageNode, node_handler: NodeHandler | None) -> list[MPSNNFilterNode] | None:
    from .nodes.arithmetic import MPSNNAdditionNode

    handler = node_handler or _default_handler
    forward = _collect(start)
    grads: dict[int, list[MPSNNImageNode]] = {id(start.result_image): [gradient]}
    made: list[MPSNNFilterNode] = []
    for node in reversed(forward):
        incoming = grads.get(id(node.result_image))
        if not incoming:
            continue
        g = incoming[0]
        for extra in incoming[1:]:
            add = MPSNNAdditionNode(g, extra)
            handler(add, None, node.result_image, g)
            made.append(add)
            g = add.result_image
        if not node._has_gradient:
            continue
        trainable = isinstance(node, MPSNNTrainableNode)
        wanted = [not src.stop_gradient or trainable for src in node._source_images]
        if not any(wanted):
            continue
        gnodes = node._make_gradient_nodes(g)
        for src, gnode, want in zip(node._source_images, gnodes, wanted):
            if gnode is None or not want:
                continue
            if trainable and isinstance(gnode, MPSNNTrainableNode):
                gnode.training_style = node.training_style  # type: ignore[attr-defined]
            handler(gnode, node, src, g)
            made.append(gnode)
            if src._producer is not None and not src.stop_gradient and not isinstance(src._producer, MPSNNGradientFilterNode):
                grads.setdefault(id(src), []).append(gnode.result_image)
    if not made:
        return None
    read: set[int] = set()
    for n in made:
        for s in n._source_images:
            read.add(id(s))
    return [n for n in made if id(n.result_image) not in read]
