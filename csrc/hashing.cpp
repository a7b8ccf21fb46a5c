// Python bindings of the hashing primitives.
#include <string>

#include "st_fast/bindings.h"
#include "st_fast/xxhash64.h"

namespace py = pybind11;

namespace st_fast {

void bind_hashing(py::module_& m) {
  m.def(
      "xxh64",
      [](py::bytes data, uint64_t seed) {
        std::string_view view = data;
        return xxh64(view.data(), view.size(), seed);
      },
      py::arg("data"), py::arg("seed") = 0, "XXH64 of a bytes object, as an unsigned 64-bit int.");
  m.def(
      "xxh64",
      [](const std::string& text, uint64_t seed) { return xxh64(text.data(), text.size(), seed); },
      py::arg("text"), py::arg("seed") = 0, "XXH64 of the UTF-8 encoding of a str.");
}

}  // namespace st_fast
