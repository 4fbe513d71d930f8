"""Numpy oracles shared by the loss, support-set and Keras-API tests, written term by term from
the paper (Sec. 3.2) rather than with the library's matrix form."""

import numpy as np


def unit(rng, n, d):
  """n random unit vectors of dimension d (float32)."""
  x = rng.normal(size=(n, d))
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def nnclr_loss(nn, p, t, symmetric=False):
  """mean_i R_i, or 0.5 * (mean_i R_i + mean_i C_i) when symmetric, in float64:
  R_i = -log(exp(nn_i . p_i / t) / sum_k exp(nn_i . p_k / t))   (softmax over predictions)
  C_i = -log(exp(nn_i . p_i / t) / sum_k exp(nn_k . p_i / t))   (softmax over neighbours)"""
  nn, p = np.asarray(nn, np.float64), np.asarray(p, np.float64)
  rows, cols = [], []
  for i in range(len(nn)):
    pos = nn[i] @ p[i] / t
    rows.append(-(pos - np.log(sum(np.exp(nn[i] @ p[k] / t) for k in range(len(p))))))
    cols.append(-(pos - np.log(sum(np.exp(nn[k] @ p[i] / t) for k in range(len(nn))))))
  return float(0.5 * (np.mean(rows) + np.mean(cols)) if symmetric else np.mean(rows))
