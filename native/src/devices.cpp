#include <unistd.h>

#include <cstring>
#include <fstream>

#include "models.h"

#if defined(SW_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

namespace sw {

namespace {

void copy_str(char *dst, size_t n, const std::string &src) {
    std::strncpy(dst, src.c_str(), n - 1);
    dst[n - 1] = '\0';
}

std::string cpu_name() {
    std::ifstream in("/proc/cpuinfo");
    std::string line;
    while (std::getline(in, line)) {
        if (line.rfind("model name", 0) == 0) {
            auto pos = line.find(':');
            if (pos != std::string::npos) return line.substr(line.find_first_not_of(" \t", pos + 1));
        }
    }
    return "cpu";
}

int64_t host_available() {
    std::ifstream in("/proc/meminfo");
    std::string key;
    int64_t value;
    std::string unit;
    while (in >> key >> value >> unit) {
        if (key == "MemAvailable:") return value * 1024;
    }
    return -1;
}

}  // namespace

std::vector<sw_device_info> list_devices() {
    std::vector<sw_device_info> out;
    sw_device_info cpu{};
    cpu.kind = SW_DEVICE_CPU;
    copy_str(cpu.id, sizeof cpu.id, "cpu");
    copy_str(cpu.name, sizeof cpu.name, cpu_name());
    const long pages = ::sysconf(_SC_PHYS_PAGES), page = ::sysconf(_SC_PAGESIZE);
    cpu.total_memory = (pages > 0 && page > 0) ? int64_t(pages) * page : -1;
    cpu.free_memory = host_available();
    out.push_back(cpu);
    if (torch::cuda::is_available()) {
        const auto n = static_cast<int32_t>(torch::cuda::device_count());
        for (int32_t i = 0; i < n; i++) {
            sw_device_info d{};
            d.kind = SW_DEVICE_CUDA;
            d.index = i;
            copy_str(d.id, sizeof d.id, "cuda:" + std::to_string(i));
            d.total_memory = -1;
            d.free_memory = -1;
            copy_str(d.name, sizeof d.name, "CUDA device " + std::to_string(i));
#if defined(SW_WITH_CUDA)
            cudaDeviceProp prop;
            if (cudaGetDeviceProperties(&prop, i) == cudaSuccess) {
                copy_str(d.name, sizeof d.name, prop.name);
                d.total_memory = static_cast<int64_t>(prop.totalGlobalMem);
            }
            int prev = 0;
            size_t free_b = 0, total_b = 0;
            if (cudaGetDevice(&prev) == cudaSuccess && cudaSetDevice(i) == cudaSuccess &&
                cudaMemGetInfo(&free_b, &total_b) == cudaSuccess) {
                d.free_memory = static_cast<int64_t>(free_b);
                d.total_memory = static_cast<int64_t>(total_b);
            }
            cudaSetDevice(prev);
#endif
            out.push_back(d);
        }
    }
    if (at::hasMPS()) {
        sw_device_info d{};
        d.kind = SW_DEVICE_MPS;
        copy_str(d.id, sizeof d.id, "mps");
        copy_str(d.name, sizeof d.name, "Apple Metal (MPS)");
        d.total_memory = -1;
        d.free_memory = -1;
        out.push_back(d);
    }
    return out;
}

}  // namespace sw
