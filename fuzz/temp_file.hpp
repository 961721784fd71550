#pragma once
// The llama2.c loaders read from a path: the fuzz targets write each input to a per-process file
// in the temporary directory (removed at exit).
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <string>

namespace fuzzsetup {

inline const std::string& temp_path(const char* name) {
  static const std::string path = [name] {
    const char* dir = std::getenv("TMPDIR");
    std::string p = std::string(dir && *dir ? dir : "/tmp") + "/xquant_" + name + "_" + std::to_string(getpid());
    static std::string keep;
    keep = p;
    std::atexit([] { std::remove(keep.c_str()); });
    return p;
  }();
  return path;
}

inline void write_file(const std::string& path, const std::uint8_t* data, std::size_t size) {
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) std::abort();
  if (size && std::fwrite(data, 1, size, f) != size) std::abort();
  std::fclose(f);
}

}  // namespace fuzzsetup
