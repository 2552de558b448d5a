"""The .csl reader/writer: round trips, orientation, and errors that name the line and the plane."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import shared_path

from fieldkit.shapes.csl import Contour, CrossSections, CSLError, Plane, find_csl, format_csl, parse_csl, read_csl, validate, write_csl

SQUARE = """CSLC
1 2

1 4 1 0 0 1 -0.5

0 0 0.5
1 0 0.5
1 1 0.5
0 1 0.5

4 1 0 1 2 3
"""


def two_plane_text() -> str:
    """Plane 1: a square with a square hole; plane 2: a triangle. Material CCW, hole CW (about +z)."""
    return """CSLC
 2 2

1 8 2 0.0 0.0 1.0 0.0

-1 -1 0
1 -1 0
1 1 0
-1 1 0
-0.5 -0.5 0
0.5 -0.5 0
0.5 0.5 0
-0.5 0.5 0

4 1 0 1 2 3
4h0 1 7 6 5 4

2 3 1 0 0 2 -1

0 0 0.5
1 0 0.5
0 1 0.5

3 1 0 1 2
"""


def assert_same(a: CrossSections, b: CrossSections) -> None:
    assert len(a.planes) == len(b.planes)
    for pa, pb in zip(a.planes, b.planes):
        np.testing.assert_array_equal(pa.vertices, pb.vertices)
        np.testing.assert_array_equal(pa.normal, pb.normal)
        assert pa.d == pb.d
        assert len(pa.contours) == len(pb.contours)
        for ca, cb in zip(pa.contours, pb.contours):
            np.testing.assert_array_equal(ca.indices, cb.indices)
            assert (ca.parent, ca.label) == (cb.parent, cb.label)


def test_parse_two_planes_with_hole():
    cs = parse_csl(two_plane_text())
    validate(cs)
    assert len(cs.planes) == 2 and cs.n_vertices == 11 and cs.n_contours == 3 and cs.n_holes == 1
    hole = cs.planes[0].contours[1]
    assert hole.is_hole and hole.parent == 0
    assert cs.planes[1].offset == pytest.approx(0.5)
    areas = cs.planes[0].signed_areas()
    assert areas[0] > 0 and areas[1] < 0  # material CCW, hole CW seen from the normal
    inside = cs.planes[0].inside(cs.planes[0].to_2d(np.array([[0.75, 0, 0], [0, 0, 0], [2, 0, 0]])))
    assert inside.tolist() == [True, False, False]  # in the ring, in the hole, outside
    assert cs.is_parallel


def test_round_trip_text_and_file(tmp_path):
    cs = parse_csl(two_plane_text())
    again = parse_csl(format_csl(cs))
    assert_same(cs, again)
    path = write_csl(cs, tmp_path / "shape.csl")
    assert_same(cs, read_csl(path))
    assert find_csl(tmp_path) == path  # a folder holding one .csl


def test_round_trip_random_planes_exact(tmp_path):
    """Arbitrary plane orientations and full float precision survive a write/read."""
    trimesh = pytest.importorskip("trimesh")
    from fieldkit.shapes.slicer import slice_mesh

    mesh = trimesh.creation.icosphere(subdivisions=3, radius=0.8)
    cs = slice_mesh(mesh, 6, "random", seed=3)
    assert len(cs.directions()) > 1
    back = read_csl(write_csl(cs, tmp_path / "s.csl"))
    assert_same(cs, back)


def test_writer_orients_contours():
    """A file with clockwise material contours (like SideBishop.csl) is written counter-clockwise."""
    cs = parse_csl(SQUARE.replace("4 1 0 1 2 3", "4 1 3 2 1 0"))
    assert cs.planes[0].signed_areas()[0] < 0
    fixed = parse_csl(format_csl(cs))
    assert fixed.planes[0].signed_areas()[0] > 0
    assert parse_csl(format_csl(cs, orient=False)).planes[0].signed_areas()[0] < 0


def test_empty_plane_and_closing_index():
    text = SQUARE.replace("1 2\n", "2 2\n") + "2 0 0 0 0 1 -0.9\n"
    cs = parse_csl(text.replace("4 1 0 1 2 3", "5 1 0 1 2 3 0"))  # explicitly closed loop
    validate(cs)
    assert len(cs.planes[1].vertices) == 0 and cs.planes[0].contours[0].indices.tolist() == [0, 1, 2, 3]
    assert_same(cs, parse_csl(format_csl(cs)))


@pytest.mark.parametrize(
    ("text", "line", "plane", "words"),
    [
        (SQUARE.replace("CSLC", "CSL"), 1, None, "header"),
        (SQUARE.replace("1 2\n", "2 2\n"), 11, 2, "file ends early"),
        (SQUARE.replace("1 4 1 0 0 1", "1 5 1 0 0 1"), 11, 1, "expected vertex 4 of 5"),
        (SQUARE.replace("1 4 1 0 0 1", "1 3 1 0 0 1"), 9, 1, "component 0"),
        (SQUARE.replace("1 4 1 0 0 1", "1 4 2 0 0 1"), 11, 1, "file ends early"),
        (SQUARE.replace("4 1 0 1 2 3", "5 1 0 1 2 3"), 11, 1, "declares 5 vertices but lists 4"),
        (SQUARE.replace("4 1 0 1 2 3", "4 1 0 1 2 7"), 11, 1, "out of range"),
        (SQUARE.replace("1 4 1 0 0 1", "2 4 1 0 0 1"), 4, 1, "out of order"),
        (SQUARE.replace("0 1 0.5", "0 one 0.5"), 9, 1, "expected numbers"),
        (SQUARE + "junk\n", 12, None, "after the last"),
        (SQUARE.replace("1 4 1 0 0 1", "1 4 1 0 0 0"), 4, 1, "normal"),
    ],
)
def test_structure_errors_name_line_and_plane(text, line, plane, words):
    with pytest.raises(CSLError) as info:
        parse_csl(text, source="bad.csl")
    message = str(info.value)
    assert f"line {line}" in message and "bad.csl" in message, message
    assert words in message, message
    if plane is not None:
        assert f"plane {plane}" in message, message
    assert info.value.line == line


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        (SQUARE.replace("1 1 0.5", "1 1 0.51"), 8, "off its plane"),
        (SQUARE.replace("4 1 0 1 2 3", "2 1 0 1"), 11, "open contour"),
        (SQUARE.replace("1 1 0.5", "2 0 0.5").replace("0 1 0.5", "3 0 0.5"), 11, "open contour"),  # collinear
        (SQUARE.replace("4 1 0 1 2 3", "4 1 0 2 1 3"), 11, "self-intersecting"),  # bow tie
        (SQUARE.replace("4 1 0 1 2 3", "4h3 1 0 1 2 3"), 11, "hole of component 3"),
    ],
)
def test_geometry_errors_name_line_and_plane(text, line, words):
    cs = parse_csl(text, source="bad.csl")
    with pytest.raises(CSLError) as info:
        validate(cs)
    message = str(info.value)
    assert f"line {line}" in message and "plane 1" in message and words in message, message


def _figure(order: list[int]) -> CrossSections:
    """Two triangles joined at vertex 0 (the origin), as one contour visiting it twice."""
    verts = np.array([[0, 0, 0], [1, -0.5, 0], [1, 0.5, 0], [-1, 0.5, 0], [-1, -0.5, 0]], dtype=float)
    return CrossSections([Plane(np.array([0, 0, 1.0]), 0.0, verts, [Contour(np.array(order), 1, None, 7)])])


def test_pinch_allowed_crossing_rejected():
    validate(_figure([0, 1, 2, 0, 3, 4]))  # two lobes touching at a vertex: allowed (Abdomen.csl has such)
    with pytest.raises(CSLError, match="crosses itself at vertex 0"):
        validate(_figure([0, 1, 2, 0, 4, 3]))  # a figure eight: the loop crosses itself


def test_folder_with_two_csl_files(tmp_path):
    (tmp_path / "a.csl").write_text(SQUARE)
    (tmp_path / "b.csl").write_text(SQUARE)
    with pytest.raises(ValueError, match="2 .csl files"):
        find_csl(tmp_path)
    with pytest.raises(FileNotFoundError):
        find_csl(tmp_path / "missing")


def test_shipped_files_parse_and_validate():
    folder = shared_path("orex")
    expected = {"eight_15": (15, 2028, 21, 0), "balloondog": (15, 4579, 27, 1), "hand_ok": (15, 4082, 29, 0), "Heart-25-even-better": (25, 4534, 33, 0), "Skull-20": (16, 8821, 43, 18), "SideBishop": (10, 1376, 22, 0)}
    for path in sorted(folder.glob("*/*.csl")):
        if path.stem not in expected:
            continue
        cs = read_csl(path)
        assert (len(cs.planes), cs.n_vertices, cs.n_contours, cs.n_holes) == expected[path.stem], path.name
        assert_same(cs, parse_csl(format_csl(cs, orient=False)))
    assert len(read_csl(folder / "csl_without_ref" / "Heart-25-even-better.csl").directions()) == 15
