"""Planes and lines: orthonormal bases, Euclidean coordinates of the checkpoints, projections with
distances, the default grid, directions (random filter-normalized, PCA, Hessian) and bad input."""
import numpy as np
import pytest
import torch

from landscape.errors import CheckpointError, ConfigError, FileFormatError, GeometryError, ModelError
from landscape.geometry import Grid, Line, Plane, filter_normalize, weights_at
from landscape.models import ModelSpec, build_model
from landscape.params import Layout
from landscape.store import TrajectoryWriter, open_trajectory
from landscape.surface import make_grid
from landscape.rebuild import rebuild_data, rebuild_model

THREE = ("sgd", "swa/average", "swa/iterates:0")


@pytest.fixture(scope="module")
def traj(tiny_run):
    return open_trajectory(tiny_run)


def _ckpt(traj, name):
    return traj.checkpoint(name).params.double()


def _write_traj(path, config, model, rows):
    layout = Layout.of(model)
    with TrajectoryWriter(path, config.to_dict(), layout) as w:
        for r in rows:
            w.append("p", r, epoch=0.0)
    return path


@pytest.fixture(scope="module")
def crafted(tmp_path_factory, traj, tiny_config):
    """A file of the tiny architecture whose run ``p`` holds a, b, a + 2 (b - a) (collinear with a, b),
    and a file of another architecture."""
    d = tmp_path_factory.mktemp("crafted")
    a, b = _ckpt(traj, "sgd:1").float(), _ckpt(traj, "sgd").float()
    data = rebuild_data(traj)
    model = rebuild_model(traj, data)
    same = _write_traj(d / "same.h5", tiny_config, model, [a, b, a + 2 * (b - a)])
    other_cfg = tiny_config.replace(model=ModelSpec("cnn1d-bn", {"channels": 4}))
    other_model = build_model(other_cfg.model, data.input_shape, data.num_classes)
    other = _write_traj(d / "other.h5", other_cfg, other_model, [Layout.of(other_model).params_to_vector(other_model)])
    return same, other


def test_plane_through_three_checkpoints(traj):
    plane = Plane.through(traj, *THREE)
    u, v = plane.u.double(), plane.v.double()
    assert abs(u.norm() - 1) < 1e-6 and abs(v.norm() - 1) < 1e-6 and abs(u @ v) < 1e-6
    w1, w2, w3 = (_ckpt(traj, n) for n in THREE)
    pts = plane.derived["points"]
    a, b, c = (pts[traj.checkpoint(n).name] for n in THREE)
    assert a == [0.0, 0.0] and b[1] == 0.0
    assert b[0] == pytest.approx(float((w2 - w1).norm()))  # true Euclidean coordinates
    for name, w in zip(THREE, (w1, w2, w3)):  # origin + x u + y v gives the checkpoint back
        coords = torch.tensor([pts[traj.checkpoint(name).name]])
        assert torch.allclose(weights_at(plane, coords)[0].double(), w, atol=1e-5)
    # the default grid covers the three points with a 0.2 margin on each side
    g = plane.default_grid((21, 21), margin=0.2)
    xs, ys = [p[0] for p in (a, b, c)], [p[1] for p in (a, b, c)]
    wx, wy = max(xs) - min(xs), max(ys) - min(ys)
    assert g.xrange == pytest.approx((min(xs) - 0.2 * wx, max(xs) + 0.2 * wx), rel=1e-5)
    assert g.yrange == pytest.approx((min(ys) - 0.2 * wy, max(ys) + 0.2 * wy), rel=1e-5)
    assert g.shape == (21, 21)


def test_projection_of_every_checkpoint(traj):
    plane = Plane.through(traj, *THREE)
    points, paths = plane.project(traj)
    assert set(paths) == set(traj.runs)
    for run in traj.runs:
        assert paths[run].coords.shape == (traj.num_checkpoints(run), 2)
        assert paths[run].distance.shape == (traj.num_checkpoints(run),)
    # the three checkpoints lie on the plane, another one off it by its residual
    for n in THREE:
        assert points[traj.checkpoint(n).name].distance < 1e-4
    w = _ckpt(traj, "sgd:1")
    o, u, v = plane.origin.double(), plane.u.double(), plane.v.double()
    x, y = (w - o) @ u, (w - o) @ v
    np.testing.assert_allclose(paths["sgd"].coords[1], [x, y], rtol=1e-6)
    assert paths["sgd"].distance[1] == pytest.approx(float((w - o - x * u - y * v).norm()), rel=1e-6)
    assert paths["sgd"].distance[1] > 1e-3
    # every run's last checkpoint is a named point too
    assert {f"{r}:{traj.num_checkpoints(r) - 1}" for r in traj.runs} <= set(points)


def test_line_through_two_checkpoints(traj):
    line = Line.through(traj, "sgd", "swa/average")
    length = float((_ckpt(traj, "swa/average") - _ckpt(traj, "sgd")).norm())
    assert line.derived["length"] == pytest.approx(length)
    assert line.derived["points"][traj.checkpoint("swa/average").name] == [pytest.approx(length)]
    g = line.default_grid()
    assert g.xrange == pytest.approx((-0.5 * length, 1.5 * length), rel=1e-5) and g.nx == 41
    points, paths = line.project(traj)
    assert points[traj.checkpoint("swa/average").name].coords[0] == pytest.approx(length, rel=1e-6)
    assert paths["sgd"].coords.shape == (traj.num_checkpoints("sgd"), 1)


def test_random_rays(traj):
    rays = Line.random_rays(traj, "swa/average", n=3, seed=1, max_distance=2.0)
    d = rays.directions.double()
    assert d.shape == (3, traj.layout.num_params)
    assert torch.allclose(d.norm(dim=1), torch.ones(3, dtype=torch.float64), atol=1e-6)
    assert abs(float(d[0] @ d[1])) < 0.5  # different directions
    g = rays.default_grid((6,))
    assert rays.values_shape(g) == (3, 6) and g.xrange == (0.0, 2.0)
    coeffs = rays.coefficients(g, np.array([7]))  # ray 1, point 1
    np.testing.assert_allclose(coeffs, [[0.0, g.x[1], 0.0]])
    again = Line.random_rays(traj, "swa/average", n=3, seed=1, max_distance=2.0)
    assert torch.equal(again.directions, rays.directions)  # the seed decides


def test_random_plane_filter_normalized(traj):
    origin = _ckpt(traj, "swa/average")
    p1 = Plane.random(traj, "swa/average", seed=3)
    p2 = Plane.random(traj, "swa/average", seed=3)
    assert torch.equal(p1.u, p2.u) and torch.equal(p1.v, p2.v) and p1.spec["seed"] == 3
    assert abs(float(p1.u.double() @ p1.v.double())) < 1e-6
    assert not torch.equal(Plane.random(traj, "swa/average", seed=4).u, p1.u)
    # filter normalization: each filter of the direction has the norm of the weights' filter
    d = filter_normalize(torch.randn(traj.layout.num_params, dtype=torch.float64), origin, traj.layout, "biasbn")
    for e, sl in traj.layout.param_slices():
        if len(e.shape) <= 1:
            assert torch.all(d[sl] == 0)  # biases and BatchNorm parameters ignored
        else:
            dn = d[sl].view(e.shape[0], -1).norm(dim=1)
            wn = origin[sl].view(e.shape[0], -1).norm(dim=1)
            assert torch.allclose(dn, wn, rtol=1e-6)
    d = filter_normalize(torch.randn(traj.layout.num_params, dtype=torch.float64), origin, traj.layout, "none")
    e, sl = next((e, sl) for e, sl in traj.layout.param_slices() if len(e.shape) == 1)
    assert torch.equal(d[sl], origin[sl])  # Li et al. without ignore: the weights themselves
    # the default grid is Li et al.'s [-1, 1]^2 in units of the directions
    g = p1.default_grid((5, 5), margin=0.2)
    assert g.xrange == pytest.approx((-p1.derived["scale"][0], p1.derived["scale"][0]), rel=1e-5)


def test_pca_plane_spans_top_components(traj):
    plane = Plane.pca(traj, "sgd")
    w = torch.from_numpy(traj.params("sgd")).double()
    m = (w - w[-1]) - (w - w[-1]).mean(0)
    _, s, vh = torch.linalg.svd(m, full_matrices=False)
    for vec, ref in ((plane.u, vh[0]), (plane.v, vh[1])):
        assert abs(float(vec.double() @ ref)) == pytest.approx(1.0, abs=1e-5)
    ratio = plane.derived["explained_variance_ratio"]
    assert ratio[0] >= ratio[1] > 0 and ratio[0] == pytest.approx(float(s[0] ** 2 / (s ** 2).sum()), rel=1e-6)
    _, paths = plane.project(traj)
    assert np.all(paths["sgd"].coords[0] <= 0)  # the sign convention: the run arrives from below
    assert plane.origin.equal(traj.checkpoint("sgd").params)


def test_hessian_plane_eigenvectors(traj):
    from torch.func import functional_call
    data = rebuild_data(traj)
    plane = Plane.hessian(traj, "swa/average", data=data, samples=200, iterations=200, tol=1e-7)
    model = rebuild_model(traj, data).eval()
    ck = traj.checkpoint("swa/average")
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(data.x_train), generator=g)[:200]
    x, y = data.x_train[idx], data.y_train[idx]
    bufs = traj.layout.split_buffers(ck.buffers)

    def loss(w):
        return torch.nn.functional.cross_entropy(functional_call(model, (traj.layout.split_params(w), bufs), (x,)), y)

    # reverse over reverse: torch.func.hessian (forward over reverse) loads torch's JVP decompositions,
    # which call the deprecated torch.jit.script (18 DeprecationWarnings from torch itself)
    hess = torch.func.jacrev(torch.func.jacrev(loss))(ck.params.clone()).double()
    evals, evecs = torch.linalg.eigh(hess)
    top = evals.abs().argsort(descending=True)[:2]
    lam = plane.derived["eigenvalues"]
    assert lam == pytest.approx(evals[top].tolist(), rel=2e-3)
    for vec, k in ((plane.u, top[0]), (plane.v, top[1])):
        assert abs(float(vec.double() @ evecs[:, k])) == pytest.approx(1.0, abs=1e-2)


def test_grid_and_bad_input(traj, crafted, tmp_path):
    plane = Plane.through(traj, *THREE)
    with pytest.raises(ConfigError, match="no points"):
        make_grid(plane, (0, 4))
    with pytest.raises(ConfigError, match="dimension"):
        make_grid(plane, (5,))
    g = make_grid(plane, (5, 4), xrange=(-1, 2))
    assert g.xrange == (-1, 2) and g.shape == (5, 4) and Grid.from_dict(g.to_dict()) == g
    with pytest.raises(GeometryError, match="given twice"):
        Plane.through(traj, "sgd", "sgd", "swa/average")
    with pytest.raises(GeometryError, match="same point"):  # the first average is the first iterate
        Plane.through(traj, "sgd", "swa/average:0", "swa/iterates:0")
    with pytest.raises(CheckpointError, match="not found"):
        Plane.through(traj, "sgd", "swa/average", "swa/iterates:99")
    with pytest.raises(CheckpointError, match="not found"):
        Line.through(traj, "sgd", "adam")
    same, other = crafted
    with pytest.raises(GeometryError, match="collinear"):
        Plane.through(open_trajectory(same), "p:0", "p:1", "p:2")
    with pytest.raises(ModelError, match="different architectures"):
        Plane.through(traj, "sgd", "swa/average", f"{other}:p")
    mixed = Plane.through(traj, "sgd", "swa/average", f"{same}:p:0")  # same architecture, other file: fine
    assert "same.h5:p:0" in mixed.derived["points"]
    not_traj = tmp_path / "x.h5"
    not_traj.write_bytes(b"not hdf5")
    with pytest.raises(FileFormatError, match="not an HDF5 file"):
        open_trajectory(not_traj)


def test_streamed_pca_equals_the_in_memory_pca(traj):
    """Subspace iteration over chunks of rows (memory independent of the number of checkpoints) gives
    the components, variances and plane of the Gram-matrix PCA."""
    import landscape.geometry as geometry
    from landscape.geometry import RunPCA
    n = traj.num_checkpoints("sgd")

    def chunks(size):
        for start in range(0, n, size):
            yield torch.from_numpy(traj.params("sgd", slice(start, min(n, start + size)))).double()
    last = torch.from_numpy(traj.params("sgd", n - 1))
    pca = RunPCA(chunks, n, last, chunk_bytes=3 * 8 * traj.layout.num_params)  # 3 rows a chunk
    assert pca.chunk_rows == 3 and not pca.fits(8 * n, block=1)
    assert pca.fits(0)  # 7 rows at once take less memory than streaming's six (P,)-vectors and a chunk
    (e1, c1, t1), (e2, c2, t2) = pca.in_memory(), pca.streamed()
    np.testing.assert_allclose(e2.numpy(), e1.numpy(), rtol=1e-9)
    assert t1 == t2
    np.testing.assert_allclose(np.abs((c1 * c2).sum(0).numpy()), 1.0, atol=1e-9)  # the same unit directions
    whole = Plane.pca(traj, "sgd")
    with pytest.MonkeyPatch.context() as m:
        m.setattr(geometry.RunPCA, "fits", lambda self, budget: False)  # every run streamed
        streamed = Plane.pca(traj, "sgd")
    np.testing.assert_allclose(streamed.u.numpy(), whole.u.numpy(), atol=1e-6)
    np.testing.assert_allclose(streamed.v.numpy(), whole.v.numpy(), atol=1e-6)
    np.testing.assert_allclose(np.array(streamed.extent), np.array(whole.extent), rtol=1e-6, atol=1e-9)
    assert streamed.derived["explained_variance_ratio"] == pytest.approx(whole.derived["explained_variance_ratio"],
                                                                         rel=1e-9)
