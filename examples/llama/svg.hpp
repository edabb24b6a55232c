#pragma once
//! \file svg.hpp
//! A hand-written SVG heatmap of which positions each (layer, KV head) kept after compression:
//! one panel per method, one row per (layer, KV head), one column per position, a filled cell
//! where the position is still in the cache.

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace llama {

struct heatmap_panel {
  std::string title;                           // e.g. "snapkv — 36 tokens per head"
  int columns = 0;                             // positions 0..columns-1 existed
  std::vector<std::vector<int32_t>> kept;      // [L * Hkv] kept positions, ascending
};

struct heatmap {
  std::string title;
  std::string subtitle;
  int layers = 0;
  int kv_heads = 0;
  std::vector<heatmap_panel> panels;
};

namespace detail {
inline std::string xml_escape(const std::string& s) {
  std::string out;
  for (const char c : s) {
    switch (c) {
      case '&': out += "&amp;"; break;
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '"': out += "&quot;"; break;
      default: out += c;
    }
  }
  return out;
}
}  // namespace detail

//! The SVG text of `map`. Cells are 2 x 7 px; runs of kept positions are drawn as one rect.
inline std::string render_svg(const heatmap& map) {
  constexpr int cell_w = 2, cell_h = 7, left = 64, right = 16, top = 56, panel_gap = 44, title_h = 18;
  int columns = 1;
  for (const auto& p : map.panels) columns = std::max(columns, p.columns);
  const int rows = map.layers * map.kv_heads;
  const int panel_h = title_h + rows * cell_h + 16;
  const int width = left + columns * cell_w + right;
  const int height = top + static_cast<int>(map.panels.size()) * (panel_h + panel_gap);
  const char* palette[] = {"#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2"};

  std::ostringstream svg;
  svg << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << width << "\" height=\"" << height
      << "\" viewBox=\"0 0 " << width << ' ' << height << "\" font-family=\"sans-serif\" font-size=\"11\">\n";
  svg << "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n";
  svg << "<text x=\"" << left << "\" y=\"22\" font-size=\"14\" font-weight=\"bold\">" << detail::xml_escape(map.title)
      << "</text>\n";
  svg << "<text x=\"" << left << "\" y=\"40\" fill=\"#444444\">" << detail::xml_escape(map.subtitle) << "</text>\n";
  for (std::size_t pi = 0; pi < map.panels.size(); ++pi) {
    const heatmap_panel& p = map.panels[pi];
    const int y0 = top + static_cast<int>(pi) * (panel_h + panel_gap);
    const int grid_y = y0 + title_h;
    std::size_t kept_total = 0;
    for (const auto& head : p.kept) kept_total += head.size();
    svg << "<g>\n<text x=\"" << left << "\" y=\"" << y0 + 12 << "\"><tspan font-size=\"12\" font-weight=\"bold\">"
        << detail::xml_escape(p.title) << "</tspan><tspan dx=\"10\" fill=\"#444444\">" << kept_total << " tokens kept, "
        << (p.kept.empty() ? 0.0 : static_cast<double>(kept_total) / static_cast<double>(p.kept.size()))
        << " per (layer, KV head)</tspan></text>\n";
    // Background: the positions that existed; beyond them nothing could be kept.
    svg << "<rect x=\"" << left << "\" y=\"" << grid_y << "\" width=\"" << p.columns * cell_w << "\" height=\""
        << rows * cell_h << "\" fill=\"#f2f2f2\" stroke=\"#bbbbbb\" stroke-width=\"0.5\"/>\n";
    for (int r = 0; r < rows && r < static_cast<int>(p.kept.size()); ++r) {
      const int layer = r / map.kv_heads;
      const int y = grid_y + r * cell_h;
      if (r % map.kv_heads == 0)
        svg << "<text x=\"" << left - 6 << "\" y=\"" << y + cell_h * map.kv_heads / 2 + 4
            << "\" text-anchor=\"end\">layer " << layer << "</text>\n";
      const auto& kept = p.kept[static_cast<std::size_t>(r)];
      for (std::size_t i = 0; i < kept.size();) {
        std::size_t j = i + 1;
        while (j < kept.size() && kept[j] == kept[j - 1] + 1) ++j;
        svg << "<rect x=\"" << left + kept[i] * cell_w << "\" y=\"" << y << "\" width=\""
            << static_cast<int>(j - i) * cell_w << "\" height=\"" << cell_h - 1 << "\" fill=\""
            << palette[layer % 8] << "\"/>\n";
        i = j;
      }
    }
    for (int l = 1; l < map.layers; ++l) {
      const int y = grid_y + l * map.kv_heads * cell_h;
      svg << "<line x1=\"" << left << "\" x2=\"" << left + p.columns * cell_w << "\" y1=\"" << y << "\" y2=\"" << y
          << "\" stroke=\"#888888\" stroke-width=\"0.5\"/>\n";
    }
    // Position axis every 64 tokens.
    const int axis_y = grid_y + rows * cell_h;
    for (int x = 0; x <= p.columns; x += 64) {
      svg << "<line x1=\"" << left + x * cell_w << "\" x2=\"" << left + x * cell_w << "\" y1=\"" << axis_y
          << "\" y2=\"" << axis_y + 4 << "\" stroke=\"black\" stroke-width=\"0.5\"/>\n";
      svg << "<text x=\"" << left + x * cell_w << "\" y=\"" << axis_y + 14 << "\" text-anchor=\"middle\">" << x
          << "</text>\n";
    }
    svg << "</g>\n";
  }
  svg << "</svg>\n";
  return svg.str();
}

//! Writes the heatmap; throws std::runtime_error naming `path` if it cannot.
inline void write_svg(const std::filesystem::path& path, const heatmap& map) {
  std::ofstream out(path, std::ios::binary);
  if (!out) throw std::runtime_error("svg '" + path.string() + "': cannot open file for writing");
  const std::string text = render_svg(map);
  out.write(text.data(), static_cast<std::streamsize>(text.size()));
  if (!out) throw std::runtime_error("svg '" + path.string() + "': write failed");
}

}  // namespace llama
