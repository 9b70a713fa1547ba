"""QK and OV circuits in factored (low-rank) form, their eigenvalues and the copying score.

Elhage et al. (2021), "A Mathematical Framework for Transformer Circuits". In our row convention
(see ``weights.py``) the token circuits of head (l, h) are

    QK = W_E W_Q W_K^T W_E^T   (V_dest, V_src)   attention score of a destination token for a source token
    OV = W_E W_V W_O W_U       (V_src, V_out)    logit effect on each output token of attending to a source

(the paper's ``W_E^T W_QK W_E`` and ``W_U W_OV W_E`` transposed). Each is a product of a (V, Dh) and a
(Dh, V) factor, so a ``FactoredMatrix`` keeps the two factors and never forms V x V unless asked
(``.full()``, ``.rows()``, ``.cols()``). Its non-zero eigenvalues are those of the small Dh x Dh
product ``B @ A``; its singular values come from QR of the factors. Scores are unscaled (no 1/sqrt(Dh)).

Copying score (Elhage et al.): ``Re(sum(lambda)) / sum(|lambda|)`` over the OV circuit's eigenvalues,
+1 for a head that raises the logit of the token it attends to, -1 for one that suppresses it.
For heads beyond layer 0 these are the direct-path circuits (the head reading embeddings directly).
"""

from __future__ import annotations

import torch
from torch import Tensor

from modformer.interp.weights import ModelWeights


class FactoredMatrix:
    """``A @ B`` kept as factors: A ``(..., m, r)``, B ``(..., r, n)``; batch dims broadcast."""

    def __init__(self, A: Tensor, B: Tensor) -> None:
        if A.shape[-1] != B.shape[-2]:
            raise ValueError(f"inner dimensions differ: A {tuple(A.shape)}, B {tuple(B.shape)}")
        self.A, self.B = A, B

    @property
    def shape(self) -> tuple[int, ...]:
        batch = torch.broadcast_shapes(self.A.shape[:-2], self.B.shape[:-2])
        return (*batch, self.A.shape[-2], self.B.shape[-1])

    @property
    def T(self) -> FactoredMatrix:
        return FactoredMatrix(self.B.transpose(-1, -2), self.A.transpose(-1, -2))

    def __getitem__(self, idx: int | tuple) -> FactoredMatrix:
        """Index the batch dims, e.g. ``qk[layer, head]``."""
        return FactoredMatrix(self.A[idx], self.B[idx])

    def __matmul__(self, other: Tensor | FactoredMatrix) -> FactoredMatrix:
        if isinstance(other, FactoredMatrix):
            return FactoredMatrix(self.A, (self.B @ other.A) @ other.B)
        return FactoredMatrix(self.A, self.B @ other)

    def __rmatmul__(self, other: Tensor) -> FactoredMatrix:
        return FactoredMatrix(other @ self.A, self.B)

    def full(self) -> Tensor:
        """The explicit ``(..., m, n)`` matrix (V x V for token circuits: only when you can afford it)."""
        return self.A @ self.B

    def rows(self, idx: Tensor | slice | list[int]) -> Tensor:
        return self.A[..., idx, :] @ self.B

    def cols(self, idx: Tensor | slice | list[int]) -> Tensor:
        return self.A @ self.B[..., :, idx]

    def eigenvalues(self) -> Tensor:
        """The r (complex) eigenvalues of ``B @ A`` = the non-zero eigenvalues of ``A @ B`` (square only)."""
        if self.A.shape[-2] != self.B.shape[-1]:
            raise ValueError(f"eigenvalues need a square matrix, got {self.shape}")
        return torch.linalg.eigvals((self.B @ self.A).double())

    def svd(self) -> tuple[Tensor, Tensor, Tensor]:
        """Compact SVD ``U (..., m, r), S (..., r), Vh (..., r, n)`` with ``U diag(S) Vh = A @ B``."""
        Qa, Ra = torch.linalg.qr(self.A)
        Qb, Rb = torch.linalg.qr(self.B.transpose(-1, -2))
        u, s, vh = torch.linalg.svd(Ra @ Rb.transpose(-1, -2))
        return Qa @ u, s, vh @ Qb.transpose(-1, -2)

    def singular_values(self) -> Tensor:
        return self.svd()[1]

    def norm(self) -> Tensor:
        """Frobenius norm from r x r products: ``||AB||^2 = tr((A^T A)(B B^T))``."""
        ga = self.A.transpose(-1, -2) @ self.A
        gb = self.B @ self.B.transpose(-1, -2)
        return (ga * gb).sum((-1, -2)).clamp_min(0).sqrt()

    def mean(self) -> Tensor:
        """Mean entry, exactly: ``(1^T A)(B 1) / (m n)``."""
        m, n = self.A.shape[-2], self.B.shape[-1]
        return (self.A.sum(-2) * self.B.sum(-1)).sum(-1) / (m * n)

    def std(self) -> Tensor:
        """Standard deviation of the entries (population), exactly."""
        m, n = self.A.shape[-2], self.B.shape[-1]
        return (self.norm() ** 2 / (m * n) - self.mean() ** 2).clamp_min(0).sqrt()


def qk_circuit(w: ModelWeights) -> FactoredMatrix:
    """Token QK circuits ``(L, H, V_dest, V_src)`` = W_E W_Q W_K^T W_E^T (biases ignored)."""
    return FactoredMatrix(w.W_E @ w.W_Q, w.W_K.transpose(-1, -2) @ w.W_E.T)


def ov_circuit(w: ModelWeights) -> FactoredMatrix:
    """Token OV circuits ``(L, H, V_src, V_out)`` = W_E W_V W_O W_U."""
    return FactoredMatrix(w.W_E @ w.W_V, w.W_O @ w.W_U)


def pos_qk_circuit(w: ModelWeights, n_pos: int | None = None) -> FactoredMatrix:
    """Positional QK circuits ``(L, H, T_dest, T_src)`` = W_pos W_Q W_K^T W_pos^T (absolute positions only)."""
    if w.W_pos is None:
        raise ValueError("the model has no absolute position embeddings (rope/alibi/none)")
    P = w.W_pos[:n_pos] if n_pos else w.W_pos
    return FactoredMatrix(P @ w.W_Q, w.W_K.transpose(-1, -2) @ P.T)


def ov_eigenvalues(w: ModelWeights) -> Tensor:
    """Complex eigenvalues ``(L, H, Dh)`` of every head's OV circuit, via the Dh x Dh product."""
    return ov_circuit(w).eigenvalues()


def qk_eigenvalues(w: ModelWeights) -> Tensor:
    """Complex eigenvalues ``(L, H, Dh)`` of every token QK circuit (positive: attends to same token)."""
    return qk_circuit(w).eigenvalues()


def eigen_score(eigs: Tensor) -> Tensor:
    """``Re(sum lambda) / sum |lambda|`` over the last dim: in [-1, 1]."""
    return (eigs.sum(-1).real / eigs.abs().sum(-1).clamp_min(1e-30)).float()


def copying_scores(w: ModelWeights) -> Tensor:
    """OV-eigenvalue copying score per head ``(L, H)`` (Elhage et al. 2021)."""
    return eigen_score(ov_eigenvalues(w))


def positional_qk_strength(w: ModelWeights, n_pos: int | None = None) -> Tensor:
    """How much of each head's QK score spread comes from positions rather than tokens ``(L, H)``, in [0, 1].

    Ratio std(pos QK) / (std(pos QK) + std(token QK)) of the two circuits' entries (weights only;
    the empirical ``heads.positional_scores`` measures it from attention patterns).
    """
    tok = qk_circuit(w).std()
    pos = pos_qk_circuit(w, n_pos).std()
    return (pos / (pos + tok).clamp_min(1e-30)).float()


def composition_eigenvalues(w: ModelWeights, layer: int = 1) -> dict[str, Tensor]:
    """Second-layer token circuits through each earlier head, as eigenvalues (Elhage et al. 2021, two layers).

    For a writer head (l0, g) with l0 < ``layer`` and a reader head h of ``layer``:

        qk_k   W_E W_Q^h W_K^h^T (W_V^g W_O^g)^T W_E^T   K-composition: the destination token against the source
               token the writer moved into the key position. Positive eigenvalues = attend where that token equals
               the current one: with a previous-token writer, the induction circuit's QK.
        ov_v   W_E W_V^g W_O^g W_V^h W_O^h W_U            the virtual head's OV circuit (copying through both)

    Returns complex eigenvalues ``(layer, H, H, Dh)`` [writer layer, writer head, reader head] under those names
    and ``eigen_score``s ``(layer, H, H)`` as ``qk_k_score`` / ``ov_v_score``. Computed from Dh x Dh products
    (``W_E^T W_E`` and ``W_U W_E`` are D x D); no V x V matrix is formed.
    """
    if not 0 < layer < w.n_layer:
        raise ValueError(f"layer must be in 1..{w.n_layer - 1} (a layer with earlier heads), got {layer}")
    E, U = w.W_E.double(), w.W_U.double()
    Wq, Wk, Wv, Wo = (t.double() for t in (w.W_Q, w.W_K, w.W_V, w.W_O))
    G = E.T @ E                                                             # (D, D)
    # qk_k: B A = W_K^h^T W_O^g^T W_V^g^T (W_E^T W_E) W_Q^h
    left = torch.einsum("hdk,lgjd->lghkj", Wk[layer], Wo[:layer])           # (l, g, h, Dh, Dh)  W_K^T W_O^T
    right = torch.einsum("lgdj,de,hek->lghjk", Wv[:layer], G, Wq[layer])    # (l, g, h, Dh, Dh)  W_V^T G W_Q
    qk = torch.linalg.eigvals(left @ right)
    # ov_v: B A = W_O^g W_V^h W_O^h (W_U W_E) W_V^g
    P = U @ E                                                                # (D, D) = W_U W_E
    first = torch.einsum("lgjd,hdk->lghjk", Wo[:layer], Wv[layer])          # (l, g, h, Dh, Dh)  W_O^g W_V^h
    second = torch.einsum("hkd,de,lgej->lghkj", Wo[layer], P, Wv[:layer])  # (l, g, h, Dh, Dh)  W_O^h (W_U W_E) W_V^g
    ov = torch.linalg.eigvals(first @ second)
    return {"qk_k": qk, "ov_v": ov, "qk_k_score": eigen_score(qk), "ov_v_score": eigen_score(ov)}
