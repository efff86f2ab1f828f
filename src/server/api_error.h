// The OpenAI error object and the HTTP status that goes with it. Request parsing and the routes throw
// ApiError; the HTTP layer turns it into
//   {"error": {"message": "...", "type": "invalid_request_error", "param": "temperature" | null, "code": ... | null}}
#pragma once

#include <nlohmann/json.hpp>

#include <stdexcept>
#include <string>

namespace nibble::server {

class ApiError : public std::runtime_error {
public:
    ApiError(int status, std::string message, std::string param = {}, std::string code = {},
             std::string type = "invalid_request_error")
        : std::runtime_error(message), status(status), param(std::move(param)), code(std::move(code)),
          type(std::move(type)) {}

    int status;         // 400, 401, 404, 413, 500 ...
    std::string param;  // the offending field, "" for none
    std::string code;   // OpenAI's machine-readable code, "" for none
    std::string type;   // invalid_request_error, authentication_error, server_error

    nlohmann::json body() const {
        nlohmann::json error = {{"message", what()},
                                {"type", type},
                                {"param", param.empty() ? nlohmann::json(nullptr) : nlohmann::json(param)},
                                {"code", code.empty() ? nlohmann::json(nullptr) : nlohmann::json(code)}};
        return {{"error", std::move(error)}};
    }
};

}  // namespace nibble::server
