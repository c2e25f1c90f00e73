// The muse command line: one binary, one subcommand per capability (cli/*_command.cpp).
#include <CLI/CLI.hpp>

#include <cstdio>
#include <exception>
#include <string>

#include <omp.h>

#include "cli/commands.h"
#ifdef MUSE_HAVE_CUDA
#include "common/device.h"
#endif

namespace {

std::string version_text() {
  std::string text = std::string("muse ") + MUSE_VERSION + "\nCPU: " + std::to_string(omp_get_max_threads()) +
                     " OpenMP threads, OpenBLAS";
#ifdef MUSE_HAVE_CUDA
  text += "\nCUDA backend: built (sm_90); " + muse::cuda::device_summary();
#else
  text += "\nCUDA backend: not built (configure with nvcc on PATH)";
#endif
  return text;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{
      "muse: train, evaluate, benchmark and serve the ResNet-BK Phase 7 / Phase 8 language models.\n"
      "O(N) models built from a tridiagonal Green-function core (BK-Core), hyperbolic windowed attention,\n"
      "an adaptive-rank state-space layer and tangent-space linear attention.",
      "muse"};
  app.set_version_flag("-V,--version", version_text(), "Print the version, threads and CUDA devices, then exit");
  app.require_subcommand(0, 1);
  muse::cli::add_prepare_command(app);
  muse::cli::add_train_command(app);
  muse::cli::add_eval_command(app);
  muse::cli::add_generate_command(app);
  muse::cli::add_chat_command(app);
  muse::cli::add_bench_command(app);
  muse::cli::add_inspect_command(app);
  muse::cli::add_diagnose_command(app);
  muse::cli::add_tokenizer_command(app);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const std::exception& e) {
    const std::string command = app.get_subcommands().empty() ? "muse" : "muse " + app.get_subcommands()[0]->get_name();
    std::fprintf(stderr, "%s: error: %s\n", command.c_str(), e.what());
    return 1;
  }
  if (app.get_subcommands().empty()) std::printf("%s", app.help().c_str());
  return 0;
}
