"""The autograd functions of the compiled kernels: each forward calls a backend (CPU or CUDA module) and
its backward calls the same backend's backward kernel."""
from __future__ import annotations

import torch

from ctalign.ops import _cpu_backend, reference
from ctalign.ops._types import TopK


class _GroupedLogmass(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, backend, vocab_size, group, n_groups, temperature):
        out, lse = backend.grouped_logmass(x, vocab_size, group, n_groups, temperature)
        out, lse = out.to(x.device), lse.to(x.device)
        ctx.save_for_backward(x, group, out, lse)
        ctx.args = (backend, vocab_size, n_groups, temperature)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, _grad_lse):
        x, group, out, lse = ctx.saved_tensors
        backend, vocab_size, n_groups, temperature = ctx.args
        grad = backend.grouped_logmass_backward(x, vocab_size, group, n_groups, temperature, out, lse,
                                                grad_out.to(out.dtype).contiguous())
        return grad.to(x.device, x.dtype), None, None, None, None, None


class _RangeLogmass(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, backend, vocab_size, order, rows, lo, hi, temperature):
        out, lse = backend.range_logmass(x, vocab_size, order, rows, lo, hi, temperature)
        out, lse = out.to(x.device), lse.to(x.device)
        ctx.save_for_backward(x, order, rows, lo, hi, out, lse)
        ctx.args = (backend, vocab_size, temperature)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, _grad_lse):
        x, order, rows, lo, hi, out, lse = ctx.saved_tensors
        backend, vocab_size, temperature = ctx.args
        grad = backend.range_logmass_backward(x, vocab_size, order, rows, lo, hi, temperature, out, lse,
                                              grad_out.to(out.dtype).contiguous())
        return grad.to(x.device, x.dtype), None, None, None, None, None, None, None


class _TrieConditional(torch.autograd.Function):
    """Dense CPU rows: next-symbol log-probabilities below trie nodes, computed by one kernel from the
    node's children (no [Q, children] range tables: a root query has one child per first symbol)."""

    @staticmethod
    def forward(ctx, x, vocab_size, order, trie_nodes, rows, nodes, width, drop_end, temperature):
        out, lse = _cpu_backend.trie_conditional_logprobs(x, vocab_size, order, trie_nodes, rows, nodes, width,
                                                          drop_end, temperature)
        ctx.save_for_backward(x, order, rows, nodes)
        ctx.args = (vocab_size, trie_nodes, width, drop_end, temperature)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, _grad_lse):
        x, order, rows, nodes = ctx.saved_tensors
        vocab_size, trie_nodes, width, drop_end, temperature = ctx.args
        grad = _cpu_backend.trie_conditional_logprobs_backward(x, vocab_size, order, trie_nodes, rows, nodes, width,
                                                               drop_end, temperature,
                                                               grad_out.to(_cpu_backend._out_dtype(x)).contiguous())
        return grad.to(x.dtype), None, None, None, None, None, None, None, None


class _CompiledSparseOutput(torch.autograd.Function):
    """Sparse rows to a sparse output on CPU (groups, trie conditionals, cover): the compiled forward
    ``kernel(indices, logprobs, *kernel_args) -> (ids, out)``; the backward differentiates the torch
    path, which lists the same ids in the same order."""

    @staticmethod
    def forward(ctx, logprobs, indices, kernel, torch_path, kernel_args):
        ctx.save_for_backward(logprobs, indices)
        ctx.torch_path = torch_path
        ids, out = kernel(indices, logprobs, *kernel_args)
        ctx.mark_non_differentiable(ids)
        return ids, out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, _grad_ids, grad_out):
        logprobs, indices = ctx.saved_tensors
        with torch.enable_grad():
            lp = logprobs.detach().requires_grad_()
            out = ctx.torch_path(TopK(indices, lp)).logprobs
            (grad,) = torch.autograd.grad(out, lp, grad_out.to(out.dtype))
        return grad, None, None, None, None


class _TopKGrouped(torch.autograd.Function):
    """Sparse rows on CPU: the compiled forward; the backward differentiates the reference (O(k))."""

    @staticmethod
    def forward(ctx, logprobs, indices, vocab_size, group, n_groups, temperature):
        ctx.save_for_backward(logprobs, indices, group)
        ctx.args = (n_groups, temperature)
        return _cpu_backend.topk_grouped_logmass(indices, logprobs, vocab_size, group, n_groups, temperature)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        logprobs, indices, group = ctx.saved_tensors
        n_groups, temperature = ctx.args
        with torch.enable_grad():
            lp = logprobs.detach().requires_grad_()
            out = reference.topk_grouped_logmass(indices, lp, group, n_groups, temperature)
            (grad,) = torch.autograd.grad(out, lp, grad_out.to(out.dtype))
        return grad, None, None, None, None, None


class _TopKLogprobs(torch.autograd.Function):
    """Compiled top-k of dense CPU rows; the backward is the softmax's: d lp_j / d x_i = (1[i = j] - p_i) / T."""

    @staticmethod
    def forward(ctx, x, vocab_size, rows, k, temperature):
        ids, lp, lse = _cpu_backend.topk_logprobs(x, vocab_size, rows, k, temperature)
        ctx.save_for_backward(x, ids, lse)
        ctx.args = (vocab_size, rows, temperature)
        ctx.mark_non_differentiable(ids, lse)
        return ids, lp, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, _grad_ids, grad_lp, _grad_lse):
        x, ids, lse = ctx.saved_tensors
        vocab_size, rows, temperature = ctx.args
        grad = _cpu_backend.topk_logprobs_backward(x, vocab_size, rows, ids, temperature, lse,
                                                   grad_lp.to(lse.dtype).contiguous())
        return grad.to(x.dtype), None, None, None, None


class _SortedL1(torch.autograd.Function):
    """ULD's exact distance by the compiled radix sorts; the gradient in the student's probabilities is
    the kernel's sign per entry (the teacher side takes none)."""

    @staticmethod
    def forward(ctx, student, teacher):
        distance, sign = _cpu_backend.sorted_l1_distance(student, teacher)
        ctx.save_for_backward(sign)
        return distance.to(student.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (sign,) = ctx.saved_tensors
        return grad[:, None] * sign, None


class _SortedL1Logits(torch.autograd.Function):
    """sorted_l1_logits with the softmax's backward, which the kernel forms: for pair q on student row r,
    d distance / d x[r, j] = p_j (sign_j - sum_i p_i sign_i) / T (repeated rows add up)."""

    @staticmethod
    def forward(ctx, student, student_rows, vs, ts, teacher, teacher_rows, vt, tt):
        d, unit, bad = _cpu_backend.sorted_l1_logits(student, student_rows, vs, ts, teacher, teacher_rows, vt, tt)
        ctx.save_for_backward(student_rows, unit)
        ctx.args = (student.shape, student.dtype, ts)
        ctx.mark_non_differentiable(bad)
        return d.to(torch.float32), bad

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad, _grad_bad):
        rows, unit = ctx.saved_tensors
        shape, dtype, ts = ctx.args
        out = torch.zeros(shape, dtype=torch.float32)
        out[:, : unit.shape[1]].index_add_(0, rows, unit * (grad.to(unit.dtype)[:, None] / ts))
        return out.to(dtype), None, None, None, None, None, None, None
