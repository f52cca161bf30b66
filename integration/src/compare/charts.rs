//! Draws the comparison's SVG charts.
