// Errors with context. Library code throws nibble::Error with a message that names what was wrong and
// where (file, tensor, field); only main() and the HTTP layer turn errors into exit codes or responses.
// Not for .cu files: fmt's headers do not compile under nvcc in C++20 mode.
#pragma once

#include <fmt/format.h>

#include <stdexcept>
#include <string>
#include <utility>

namespace nibble {

class Error : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

template <class... Args>
[[noreturn]] void fail(fmt::format_string<Args...> format, Args&&... args) {
    throw Error(fmt::format(format, std::forward<Args>(args)...));
}

}  // namespace nibble

// Always-on check for user-reachable conditions (never compiled out, unlike assert).
#define NIBBLE_CHECK(cond, ...)           \
    do {                                  \
        if (!(cond)) ::nibble::fail(__VA_ARGS__); \
    } while (0)
